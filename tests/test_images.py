"""Specifications for mnist_jax.images: user image files -> MNIST-style 28x28 inputs."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mnist_jax.errors import DataError, UsageError
from mnist_jax.images import (
    IMAGE_SUFFIXES,
    iter_image_batches,
    iter_image_files,
    load_image,
    render_like_photo,
    to_mnist,
)


def _segment(img: np.ndarray, p: tuple[float, float], q: tuple[float, float], w: float) -> None:
    """Draw an anti-aliased thick segment p->q (row, col) into img (float, 0..1), in place."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(float)
    (py, px), (qy, qx) = p, q
    d = np.array([qy - py, qx - px])
    t = np.clip(((yy - py) * d[0] + (xx - px) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.hypot(yy - (py + t * d[0]), xx - (px + t * d[1]))
    np.maximum(img, np.clip(w / 2 + 0.5 - dist, 0, 1), out=img)


def synthetic_digit() -> np.ndarray:
    """An MNIST-like '7' drawn with numpy: white on black, ~20 px tall, centred by mass."""
    img = np.zeros((28, 28))
    _segment(img, (6, 7), (6, 20), 2.5)
    _segment(img, (6, 20), (22, 11), 2.5)
    _segment(img, (14, 12), (14, 19), 2.0)
    cy, cx = centre_of_mass(img)
    img = np.roll(img, (round(14 - cy), round(14 - cx)), axis=(0, 1))
    return np.round(img * 255).astype(np.uint8)


def photo_l(size: int = 140) -> Image.Image:
    """The synthetic digit as dark ink on white paper, large and off-centre (mode L)."""
    big = Image.fromarray(synthetic_digit()).resize((90, 90), Image.Resampling.BICUBIC)
    paper = np.full((size, size), 255, np.uint8)
    paper[10:100, 35:125] = 255 - np.asarray(big)
    return Image.fromarray(paper)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def corr_up_to_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation over 1-pixel shifts: centring to the nearest pixel leaves +-0.5 px."""
    return max(corr(np.roll(a, (dy, dx), axis=(0, 1)), b) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    a = a.astype(float)
    idx = np.arange(a.shape[0])
    return float((a.sum(1) * idx).sum() / a.sum()), float((a.sum(0) * idx).sum() / a.sum())


def assert_mnist_like(out: np.ndarray) -> None:
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert border.max() == 0  # white digit on black
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert rows[-1] - rows[0] + 1 <= 20 and cols[-1] - cols[0] + 1 <= 20
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 19  # scaled up to fill the box
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1, (cy, cx)


def _one_line_error(path: Path, expect: str) -> str:
    with pytest.raises(DataError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg and expect in msg, msg
    return msg


# ---------------------------------------------------------------------------------- to_mnist


def test_round_trip_dark_on_white_rgb_off_centre() -> None:
    digit = synthetic_digit()
    rgb = np.full((160, 220, 3), (245, 240, 230), np.uint8)  # tinted paper, not square
    big = np.asarray(Image.fromarray(digit).resize((100, 100), Image.Resampling.BICUBIC)) / 255.0
    patch = rgb[50:150, 110:210]
    rgb[50:150, 110:210] = np.round(patch * (1 - big[..., None]) + 30 * big[..., None])
    out = to_mnist(Image.fromarray(rgb))
    assert_mnist_like(out)
    assert corr(out, to_mnist(digit)) > 0.9


def test_mnist_input_is_nearly_unchanged() -> None:
    digit = synthetic_digit()
    out = to_mnist(digit)
    assert_mnist_like(out)
    assert corr_up_to_shift(out, digit) > 0.95


def _mode_variants() -> dict[str, Image.Image | np.ndarray]:
    lum = photo_l()
    a = np.asarray(lum)
    ink = (255 - a).astype(np.uint8)
    zeros = np.zeros_like(a)
    return {
        "L": lum,
        "RGB": lum.convert("RGB"),
        "RGBA transparent background": Image.fromarray(np.dstack([zeros, zeros, zeros, ink])),
        "P": lum.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "LA": Image.merge("LA", [Image.fromarray(zeros), Image.fromarray(ink)]),
        "I;16": Image.fromarray(a.astype(np.uint16) * 257),
        "I (32-bit, 16-bit values)": Image.fromarray(a.astype(np.int32) * 257),
        "F (0..1)": Image.fromarray(a.astype(np.float32) / 255),
        "F (0..255)": Image.fromarray(a.astype(np.float32)),
        "1": lum.point(lambda v: 255 if v > 127 else 0).convert("1"),
        "ndarray RGB": np.asarray(lum.convert("RGB")),
        "ndarray uint16": a.astype(np.uint16) * 257,
    }


@pytest.mark.parametrize("name", list(_mode_variants()))
def test_modes_agree_with_l(name: str) -> None:
    img = _mode_variants()[name]
    if name == "I;16":
        assert img.mode == "I;16"
    ref = to_mnist(photo_l())
    out = to_mnist(img)
    assert_mnist_like(out)
    assert corr(out, ref) > 0.9, name


def test_sixteen_bit_uses_real_range_not_clipped() -> None:
    """A 16-bit digit using only values up to 40000 must not saturate at 255."""
    a = (np.asarray(photo_l()).astype(np.float64) / 255 * 40000).astype(np.uint16)
    assert corr(to_mnist(Image.fromarray(a)), to_mnist(photo_l())) > 0.95


@pytest.mark.parametrize(
    "img",
    [np.zeros((28, 28), np.uint8), np.full((50, 70), 255, np.uint8), np.full((1, 1), 200, np.uint8),
     Image.new("RGBA", (40, 40), (0, 0, 0, 0))],
    ids=["black", "white", "1x1", "fully transparent"],
)
def test_blank_is_data_error(img: Image.Image | np.ndarray) -> None:
    with pytest.raises(DataError, match="contains no digit"):
        to_mnist(img)


def test_render_like_photo_looks_like_a_photo() -> None:
    rng = np.random.default_rng(1)
    photo = render_like_photo(synthetic_digit(), rng, size=120)
    assert photo.mode == "RGB" and photo.size == (120, 120)
    a = np.asarray(photo)
    assert 200 < np.median(a) <= 255 and a.min() < 120  # light paper, dark ink
    sizes = {render_like_photo(synthetic_digit(), rng).size[0] for _ in range(10)}
    assert min(sizes) >= 60 and max(sizes) <= 300 and len(sizes) > 1
    assert corr_up_to_shift(to_mnist(photo), to_mnist(synthetic_digit())) > 0.9


# --------------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"),
                                        ("GIF", ".gif"), ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_formats_load(tmp_path: Path, fmt: str, suffix: str) -> None:
    assert suffix in IMAGE_SUFFIXES
    photo = photo_l().convert("RGB")
    path = tmp_path / f"digit{suffix}"
    photo.save(path, fmt)
    out = load_image(path)
    assert_mnist_like(out)
    assert corr(out, to_mnist(photo)) > 0.9


def test_animated_gif_and_multiframe_tiff_use_first_frame(tmp_path: Path) -> None:
    first = photo_l()
    other = Image.fromarray(255 - np.asarray(first)[::-1, ::-1])  # a different picture
    for name in ("anim.gif", "pages.tif"):
        first.save(tmp_path / name, save_all=True, append_images=[other, other])
        with Image.open(tmp_path / name) as im:
            assert im.n_frames >= 2
        assert corr(load_image(tmp_path / name), to_mnist(first)) > 0.95, name


def test_sixteen_bit_png_and_alpha_png_load(tmp_path: Path) -> None:
    a = np.asarray(photo_l())
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    ink = (255 - a).astype(np.uint8)
    rgba = np.dstack([np.full_like(a, 20), np.full_like(a, 20), np.full_like(a, 90), ink])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    ref = to_mnist(photo_l())
    assert corr(load_image(tmp_path / "deep.png"), ref) > 0.95
    assert corr(load_image(tmp_path / "alpha.png"), ref) > 0.95


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = photo_l().convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the camera stored the picture sideways
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif)
    assert corr(load_image(tmp_path / "phone.jpg"), to_mnist(upright)) > 0.9


def test_large_photo_is_reduced_and_still_the_same_digit(tmp_path: Path) -> None:
    """A 12-megapixel phone-sized photo is box-reduced first and still gives the same digit."""
    small = render_like_photo(synthetic_digit(), np.random.default_rng(3), size=300)
    small.resize((4000, 3000), Image.Resampling.BILINEAR).save(tmp_path / "big.jpg", quality=90)
    out = load_image(tmp_path / "big.jpg")
    assert_mnist_like(out)
    assert corr_up_to_shift(out, to_mnist(small.resize((400, 300)))) > 0.9


def _png_header_only_bomb(path: Path, width: int, height: int) -> None:
    """A valid 1-bit all-white PNG of any size, written in a few MB of memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    idat = b"".join(comp.compress(row * 100) for _ in range(height // 100))
    idat += comp.compress(row * (height % 100)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [8000, 10000, 20000])  # 64 MP (our limit), 100 MP, 400 MP
def test_decompression_bomb_refused_before_decoding(tmp_path: Path, side: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"huge{side}.png"
    _png_header_only_bomb(path, side, side)
    assert path.stat().st_size < 200_000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels of a decompression bomb were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused from the header alone
    _one_line_error(path, "too large")


def test_one_by_one_with_no_ink_is_blank(tmp_path: Path) -> None:
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    _one_line_error(tmp_path / "dot.png", "blank image")


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("this is not an image\n")
    _one_line_error(tmp_path / "x.png", "not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    _one_line_error(tmp_path / "empty.png", "empty file")
    buf = io.BytesIO()
    render_like_photo(synthetic_digit(), np.random.default_rng(0), size=200).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _one_line_error(tmp_path / "cut.png", "truncated or corrupt")
    (tmp_path / "folder.png").mkdir()
    _one_line_error(tmp_path / "folder.png", "is a directory")
    _one_line_error(tmp_path / "missing.png", "no such file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    photo_l().save(path)
    if os.geteuid() == 0:  # root reads anything: simulate the refusal the OS would give
        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(Image, "open", refuse)
    else:
        path.chmod(0)
    _one_line_error(path, "permission denied")


# ------------------------------------------------------------------------ files and batches


def test_iter_image_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["z.png", "a.JPG", "b/c.webp", "notes.txt", "._a.png", ".hidden/h.png"]:
        (tmp_path / rel).write_bytes(b"x")
    single = tmp_path / "notes.txt"
    got = list(iter_image_files([tmp_path, single]))
    assert got == [tmp_path / "a.JPG", tmp_path / "z.png", tmp_path / "b" / "c.webp", single]
    with pytest.raises(DataError, match="no such file"):
        list(iter_image_files([tmp_path, tmp_path / "nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list(iter_image_files([tmp_path / "empty"]))


def test_batches_stream_and_report_bad_files_in_folder(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(synthetic_digit()).save(buf, "PNG")
    png = buf.getvalue()
    for i in range(2500):
        (folder / ("sub" if i % 2 else "") / f"{i:05d}.png").write_bytes(png)
    (folder / "broken.png").write_bytes(b"garbage")
    batches = list(iter_image_batches([folder], batch_size=1000))
    assert [len(f) for f, _, _ in batches] == [1000, 1000, 500]
    assert [x.shape for _, x, _ in batches] == [(1000, 28, 28), (1000, 28, 28), (500, 28, 28)]
    errors = [e for _, _, errs in batches for e in errs]
    assert len(errors) == 1 and errors[0][0] == folder / "broken.png"
    assert "broken.png" in errors[0][1] and "not an image" in errors[0][1]
    assert batches[0][1] is not batches[1][1]
    assert all(np.array_equal(x[0], to_mnist(synthetic_digit())) for _, x, _ in batches)
    # The same bad file named explicitly is fatal.
    with pytest.raises(DataError, match="broken.png"):
        list(iter_image_batches([folder / "broken.png"]))
    with pytest.raises(UsageError):
        list(iter_image_batches([folder], batch_size=0))


# ----------------------------------------------------------------------------- real digits


def _mnist_test_images(n: int) -> np.ndarray:
    root = Path(os.environ["MNIST_JAX_DATA_DIR"])
    path = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        path = root / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        header = f.read(16)
        magic, count, rows, cols = struct.unpack(">IIII", header)
        assert magic == 2051 and (rows, cols) == (28, 28)
        data = f.read(n * 28 * 28)
    return np.frombuffer(data, np.uint8).reshape(n, 28, 28)


@pytest.mark.realdata
@pytest.mark.skipif("MNIST_JAX_DATA_DIR" not in os.environ,
                    reason="MNIST_JAX_DATA_DIR is not set: no real MNIST digits to render")
def test_real_digits_survive_photo_round_trip(tmp_path: Path) -> None:
    digits = _mnist_test_images(500)
    rng = np.random.default_rng(0)
    corrs = []
    for i, digit in enumerate(digits):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        render_like_photo(digit, rng).save(path)
        corrs.append(corr(load_image(path), digit))
    mean = float(np.mean(corrs))
    print(f"\nreal MNIST photo round trip: mean correlation {mean:.3f} "
          f"(median {np.median(corrs):.3f}, 5th percentile {np.percentile(corrs, 5):.3f})")
    assert mean > 0.8
