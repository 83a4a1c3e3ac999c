"""Turn users' image files into MNIST-style 28x28 inputs, the way MNIST itself was made.

MNIST digits are white ink on black, size-normalised to fit a 20x20 box (aspect ratio kept,
anti-aliased) and placed in a 28x28 field so that their centre of mass sits at pixel (14, 14)
(row, column; the real test set averages 13.99, 14.01). :func:`to_mnist` applies the same
recipe to a photo or scan of a digit: dark ink on light paper, any size, mode or bit depth.

Rule for bad files: a file the caller *named explicitly* that cannot be used raises
:class:`~mnist_jax.errors.DataError` (one line naming the file); a bad file found *inside a
named folder* is reported by :func:`iter_image_batches` as an ``(path, message)`` entry and
skipped, so one broken file does not stop a folder of thousands.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnist_jax.errors import DataError, UsageError, first_line

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
MAX_PIXELS = 50_000_000
"""Images with more pixels are refused before decoding (decompression-bomb guard)."""

_BOX, _FIELD = 20, 28  # MNIST: digit fits 20x20, placed in a 28x28 field.
_MIN_CONTRAST = 0.1  # ink must differ from the paper by >= 10% of full range (~26/255)
_INK_FLOOR = 0.1  # fraction of the ink contrast treated as paper (drops faint shading)
_WORK_SIDE = 1024  # huge images are box-reduced to about this size before processing
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's convert("L")


def _scale(a: np.ndarray) -> float:
    """Full-scale value of an array by dtype: uint8 255, uint16 65535; else inferred from data."""
    if a.dtype == np.uint8:
        return 255.0
    if a.dtype == np.uint16:
        return 65535.0
    if a.dtype == np.bool_:
        return 1.0
    top = float(np.max(a)) if a.size else 1.0
    # 32-bit int ("I") and float ("F") images carry no declared range: use the smallest usual
    # one that holds the data (1, 255 or 65535), so they are not clipped at 255.
    for s in (1.0, 255.0, 65535.0):
        if top <= s:
            return s
    return top


def _as_gray(img: Image.Image | np.ndarray) -> np.ndarray:
    """Grayscale float32 in [0, 1], transparent areas composited onto white paper."""
    if isinstance(img, Image.Image):
        if min(img.size) > 2 * _WORK_SIDE and img.mode in ("L", "RGB", "RGBA", "I", "F"):
            img = img.reduce(min(img.size) // _WORK_SIDE)  # box average: cheap and antialiased
        if img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV") and "transparency" not in img.info:
            img = img.convert("RGB" if img.mode != "1" else "L")
        elif img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
            img = img.convert("RGBA")
        a = np.asarray(img)
    else:
        a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)) or a.size == 0:
        raise DataError(f"unsupported image array shape {a.shape}")
    if a.dtype.kind == "f":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    a = a.astype(np.float32) / np.float32(_scale(a))
    if a.ndim == 2:
        return np.clip(a, 0.0, 1.0)
    alpha = None
    if a.shape[2] in (2, 4):
        a, alpha = a[:, :, :-1], np.clip(a[:, :, -1], 0.0, 1.0)
    g = a[:, :, 0] if a.shape[2] == 1 else a @ _LUMA
    if alpha is not None:
        g = g * alpha + (1.0 - alpha)  # transparent = white paper
    return np.clip(g, 0.0, 1.0)


def to_mnist(img: Image.Image | np.ndarray) -> np.ndarray:
    """Convert an image of one digit into a (28, 28) uint8 MNIST-style array.

    Accepts a Pillow image of any size and mode (1, L, P, RGB, RGBA, LA, I;16, I, F, ...) or a
    2-D/3-D numpy array (gray, gray+alpha, RGB, RGBA). Steps:

    1. Composite alpha onto white (transparent background = paper); convert to grayscale in
       [0, 1] using the real range of the data (16-bit by 65535, not clipped at 255).
    2. Polarity: the *median of the border pixels* estimates the background, because the edge
       of a photo or scan is almost always paper, while a bold digit on a small canvas can cover
       half the image and sway a whole-image median. A light background (> 0.5) is inverted, so
       the result is white ink on black like MNIST (which is left as it is).
    3. Light threshold: everything within ``_INK_FLOOR`` of the ink contrast above the
       background level (or 6 robust standard deviations of the border noise, if larger) counts
       as paper; the rest is stretched so the strongest ink is 1.
    4. Crop to the ink's bounding box, scale it to fit 20x20 keeping the aspect ratio (BOX area
       averaging when shrinking, LANCZOS when enlarging; anti-aliased), and paste it in a black
       28x28 field shifted so its centre of mass is at (14, 14), clipped to the field.

    Pillow images with both sides over 2048 px are first box-reduced by an integer factor (to
    at least 1024 px a side): fast, and only a digit under ~2% of the picture's side loses
    detail. Raises DataError when the image has no ink (uniform, including any 1x1 image).
    """
    g = _as_gray(img)
    border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
    bg = float(np.median(border))
    if bg > 0.5:
        g, border, bg = 1.0 - g, 1.0 - border, 1.0 - bg
    peak = float(g.max())
    if peak - bg < _MIN_CONTRAST:
        raise DataError("image contains no digit (blank image)")
    noise = 1.4826 * float(np.median(np.abs(border - bg)))
    lo = bg + max(_INK_FLOOR * (peak - bg), 6.0 * noise)
    ink = np.clip((g - lo) / (peak - lo), 0.0, 1.0)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise DataError("image contains no digit (blank image)")
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = ink.shape
    f = _BOX / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))  # Pillow: (width, height)
    filt = Image.Resampling.BOX if f <= 1 else Image.Resampling.LANCZOS
    box = np.asarray(Image.fromarray(ink).resize(size, filt), np.float32)
    box = np.clip(box, 0.0, 1.0)
    box /= max(float(box.max()), 1e-6)  # thin strokes fade when shrunk; MNIST ink peaks at 255
    mass = box.sum()
    cy = float((box.sum(axis=1) * np.arange(box.shape[0])).sum() / mass)
    cx = float((box.sum(axis=0) * np.arange(box.shape[1])).sum() / mass)
    top, left = round(_FIELD / 2 - cy), round(_FIELD / 2 - cx)
    out = np.zeros((_FIELD, _FIELD), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + box.shape[0], _FIELD), min(left + box.shape[1], _FIELD)
    out[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.round(out * 255.0).astype(np.uint8)


def _too_large(p: Path, pixels: int | None) -> DataError:
    size = f"{pixels:,} pixels; " if pixels is not None else ""
    return DataError(f"{p}: image too large ({size}limit {MAX_PIXELS:,}), "
                     "refused as a possible decompression bomb")


def _decode(p: Path) -> Image.Image:
    """Open ``p`` and return its first frame, decoded and upright; Pillow's errors pass through."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(p) as im:
            w, h = im.size  # from the header: refuse bombs before decoding
            if w * h > MAX_PIXELS:
                raise _too_large(p, w * h)
            im.seek(0)
            im.load()
            try:  # phone photos are often stored sideways with an EXIF rotation tag
                return ImageOps.exif_transpose(im)  # a copy: usable after the file is closed
            except Exception:  # a damaged EXIF block must not lose the picture
                return im.copy()


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file and return it as a (28, 28) uint8 MNIST-style array (see to_mnist).

    Only the first frame of an animated GIF or multi-frame TIFF is used; an EXIF orientation
    tag (common in phone photos) is applied. Images over ``MAX_PIXELS`` (50 megapixels) are
    refused from their header, before decoding, so a decompression bomb cannot use gigabytes.
    Every failure (missing, a directory, empty, no permission, not an image, truncated or
    corrupt data, too large, blank) raises a one-line DataError naming the file.
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise DataError(f"{p}: is a directory, not an image file")
        if not p.exists():
            raise DataError(f"{p}: no such file")
        if p.stat().st_size == 0:
            raise DataError(f"{p}: empty file (0 bytes), not an image")
        img = _decode(p)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"(\d+) pixels", str(e))  # Pillow's own, larger limit tripped first
        raise _too_large(p, int(found.group(1)) if found else None) from None
    except UnidentifiedImageError:
        raise DataError(f"{p}: not an image file Pillow can read") from None
    except PermissionError:
        raise DataError(f"{p}: permission denied") from None
    except Exception as e:  # damaged files make decoders raise OSError, SyntaxError, struct.error
        raise DataError(f"{p}: truncated or corrupt image data ({first_line(e) or type(e).__name__})") from None
    try:
        return to_mnist(img)
    except DataError as e:
        raise DataError(f"{p}: {e}") from None


def _walk(paths: Sequence[str | Path]) -> Iterator[tuple[Path, bool]]:
    """Yield (file, named_explicitly) for files as given and image files inside folders."""
    given = [Path(p) for p in paths]
    for p in given:  # check all paths before yielding anything
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
    for p in given:
        if not p.is_dir():
            yield p, True
            continue
        found = False

        def fail(err: OSError) -> None:
            raise DataError(f"{err.filename or p}: cannot list folder ({first_line(err) or type(err).__name__})")

        for root, dirs, files in os.walk(p, onerror=fail):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found = True
                    yield Path(root, name), False
        if not found:
            raise DataError(
                f"{p}: folder contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )


def iter_image_files(paths: Sequence[str | Path]) -> Iterator[Path]:
    """Yield the files given, plus the image files found inside the folders given.

    Folders are searched recursively; within each folder names are sorted (its own files
    first, then its subfolders in order). Only files whose suffix is in IMAGE_SUFFIXES (any
    case) are taken from folders; hidden files and folders (names starting with ".", such as
    macOS "._x.png" resource files) are skipped. Files named explicitly are yielded as they
    are, whatever their suffix. A path that does not exist, a folder with no images or an
    unlistable folder raises DataError (all paths are checked before the first file is yielded).
    """
    for p, _ in _walk(paths):
        yield p


def iter_image_batches(
    paths: Sequence[str | Path], batch_size: int = 1024
) -> Iterator[tuple[list[Path], np.ndarray, list[tuple[Path, str]]]]:
    """Stream images as ``(files, images, errors)`` batches in bounded memory.

    ``images`` is a ``(len(files), 28, 28)`` uint8 array (see to_mnist); every batch but the
    last holds exactly ``batch_size`` images. ``errors`` lists ``(path, message)`` for bad
    files found inside folders since the previous batch (the message is the one-line DataError
    text); those files are skipped. A bad file named explicitly raises DataError instead. The
    last batch may hold no images if the trailing files were all bad.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    buf = np.empty((batch_size, _FIELD, _FIELD), np.uint8)
    for p, explicit in _walk(paths):
        try:
            buf[len(files)] = load_image(p)
        except DataError as e:
            if explicit:
                raise
            errors.append((p, str(e)))
            continue
        files.append(p)
        if len(files) == batch_size:
            yield files, buf, errors
            files, errors = [], []
            buf = np.empty_like(buf)  # fresh array: the caller may keep the previous one
    if files or errors:
        yield files, buf[: len(files)].copy(), errors


def render_like_photo(
    digit28: np.ndarray, rng: np.random.Generator, size: int | None = None
) -> Image.Image:
    """Render an MNIST digit (white on black, 28x28) as a photo of ink on paper (test/demo).

    Returns an RGB image ``size`` pixels square (random 60-300 if None): light, slightly tinted
    and noisy paper (gray ~220-250), dark ink, the digit enlarged to 45-85% of the canvas and
    placed off-centre at random, sometimes slightly blurred.
    """
    side = int(size) if size is not None else int(rng.integers(60, 301))
    d = max(8, int(side * rng.uniform(0.45, 0.85)))
    d = min(d, side)
    a = np.asarray(digit28, np.float32) / (255.0 if np.asarray(digit28).dtype == np.uint8 else 1.0)
    big = Image.fromarray(a).resize((d, d), Image.Resampling.BICUBIC)
    alpha = np.zeros((side, side), np.float32)
    y, x = rng.integers(0, side - d + 1, size=2)
    alpha[y : y + d, x : x + d] = np.clip(np.asarray(big), 0.0, 1.0)
    paper = rng.uniform(220, 250) + rng.uniform(-6, 6, size=3)
    ink = rng.uniform(10, 70) + rng.uniform(-10, 10, size=3)
    rgb = paper * (1.0 - alpha[..., None]) + ink * alpha[..., None]
    rgb += rng.normal(0.0, rng.uniform(1.0, 4.0), size=rgb.shape)
    out = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * side / 100))
    return out
