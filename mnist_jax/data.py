"""MNIST / Fashion-MNIST loading: tfds (official archives), a strict IDX reader, a uint8 cache.

``load_dataset`` is the entry point. The first run prepares the archives with
tensorflow-datasets (or reads the IDX files directly) and writes an ``.npz`` cache; later
runs read that cache with NumPy alone and never import TensorFlow. The preprocessing helpers
mirror the Keras MNIST tutorial (``x / 255``, ``to_categorical``, ``validation_split``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from mnist_jax.atomic import atomic_path
from mnist_jax.errors import DataError, UsageError
from mnist_jax.names import DATASETS

DATA_DIR_ENV = "MNIST_JAX_DATA_DIR"
CACHE_DIR_ENV = "MNIST_JAX_CACHE_DIR"
TRAIN_EXAMPLES = 60_000  # training images of either dataset
NUM_CLASSES = 10
SOURCES = ("auto", "tfds", "idx")
IMAGE_SHAPE = (28, 28)
# File stems as published; the ".gz" archive or the uncompressed file is accepted.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits of one dataset: images (N, 28, 28) uint8, labels (N,) int32."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # "tfds", "idx" or "cache"
    load_seconds: float = 0.0


class _TfdsRefused(DataError):
    """tfds cannot be used here (checksums differ, or it/TensorFlow is not installed)."""


def _dataset(name: str, arrays: dict[str, np.ndarray], source: str) -> Dataset:
    """A Dataset from the four arrays keyed like IDX_FILES (labels as int32)."""
    return Dataset(
        name=name,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
        source=source,
    )


def _fail(path: Path | str, problem: object) -> DataError:
    """A one-line DataError naming ``path``."""
    return DataError(f"{path}: {' '.join(str(problem).split())}")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed or raw) into an array shaped by its header.

    Raises DataError (one line, naming the file) for a missing, unreadable, empty, corrupt
    or inconsistent file.
    """
    path = Path(path)
    if path.is_dir():
        raise _fail(path, "is a directory, expected an IDX file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if not raw:
        raise _fail(path, "empty file")
    data = raw
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _fail(path, f"truncated or corrupt gzip data ({e})") from None
    if len(data) < 4:
        raise _fail(path, f"too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise _fail(
            path,
            f"bad magic number 0x{magic:08x}, expected 0x000008NN for uint8 data "
            "(0x00000803 images, 0x00000801 labels)",
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _fail(path, f"truncated header: {ndim} dims need {header} bytes, got {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    want, got = math.prod(dims), len(data) - header
    if got != want:
        kind = "truncated" if got < want else "trailing bytes"
        raise _fail(path, f"payload is {got} bytes but header dims {dims} need {want} ({kind})")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _find_idx_files(folder: Path) -> dict[str, Path]:
    """Locate the four IDX files in ``folder`` (``.gz`` preferred over uncompressed)."""
    if not folder.is_dir():
        raise _fail(folder, "no such folder")
    found = {}
    for key, stem in IDX_FILES.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise _fail(folder, f"missing {stem}.gz (or uncompressed {stem})")
        found[key] = path
    return found


def _check_split(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    """Validate one split: (N, 28, 28) images, N labels, labels within 0..9."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise _fail(img_path, f"images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1:
        raise _fail(lbl_path, f"labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
        raise _fail(lbl_path, f"{len(labels)} labels for {len(images)} images in {img_path.name}")
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise _fail(lbl_path, f"label {labels[bad[0]]} at index {bad[0]} is outside 0..9")


def load_idx_folder(folder: str | os.PathLike[str], name: str = "mnist") -> Dataset:
    """Read and validate the four IDX files of ``folder`` with the plain reader."""
    files = _find_idx_files(Path(folder))
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        _check_split(
            arrays[f"{split}_images"], arrays[f"{split}_labels"],
            files[f"{split}_images"], files[f"{split}_labels"],
        )
    return _dataset(name, arrays, "idx")


def load_tfds(
    name: str, manual_dir: str | os.PathLike[str], tfds_data_dir: str | os.PathLike[str]
) -> Dataset:
    """Prepare ``name`` with tensorflow-datasets from the official archives in ``manual_dir``.

    The prepared TFRecords go to ``tfds_data_dir``. tfds shuffles the examples while
    preparing, so the order differs from the IDX files. Raises DataError when the archives
    are not the official bytes (tfds' checksum check) or tfds/TensorFlow cannot be imported.
    """
    manual_dir = Path(manual_dir)
    missing = [f"{s}.gz" for s in IDX_FILES.values() if not (manual_dir / f"{s}.gz").is_file()]
    if missing:
        raise _fail(manual_dir, f"tfds needs the official .gz archives; missing {', '.join(missing)}")
    checksum_error: type | tuple[()] = ()
    try:
        import tensorflow_datasets as tfds

        checksum_error = tfds.download.download_manager.NonMatchingChecksumError
        tfds.disable_progress_bar()  # one line of ours says what is loaded; theirs floods logs
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        splits = tfds.load(
            name,
            split=["train", "test"],
            data_dir=str(tfds_data_dir),
            batch_size=-1,
            as_supervised=True,
            download_and_prepare_kwargs={"download_config": config},
        )
        (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    except ImportError as e:  # tfds itself, or TensorFlow (imported lazily while preparing)
        raise _TfdsRefused(f"tensorflow-datasets/TensorFlow cannot be imported: {e}") from e
    except Exception as e:
        if not isinstance(e, checksum_error):
            raise
        raise _TfdsRefused(
            f"{manual_dir}: the archives are not the official {name} bytes "
            "(tfds checksum mismatch); use source='idx' to read them directly"
        ) from e
    return Dataset(
        name=name,
        train_images=np.squeeze(train_x, -1),
        train_labels=train_y.astype(np.int32),
        test_images=np.squeeze(test_x, -1),
        test_labels=test_y.astype(np.int32),
        source="tfds",
    )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, name: str) -> Path:
    """The folder holding ``name``'s files: ``data_dir``, else $MNIST_JAX_DATA_DIR.

    A ``<dir>/<name>`` subfolder is preferred when present, so one root serves all datasets.
    """
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        raise UsageError(f"no data folder: pass --data-dir DIR or set {DATA_DIR_ENV}")
    root = Path(root).expanduser()
    if (root / name).is_dir():
        return root / name
    if not root.is_dir():
        raise _fail(root, "data folder does not exist or is not a folder")
    return root


def default_cache_dir() -> Path:
    """$MNIST_JAX_CACHE_DIR, else ``~/.cache/mnist_jax``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mnist_jax"


def _fingerprint(files: dict[str, Path]) -> str:
    """A cheap key of the source files: names, sizes and modification times."""
    h = hashlib.sha256()
    for path in files.values():
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_cache(path: Path, name: str) -> Dataset | None:
    """The cached dataset, or None if absent; a damaged cache is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in IDX_FILES}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.dtype != np.uint8 or y.dtype != np.uint8:
                raise ValueError("arrays are not uint8")
            _check_split(x, y, path, path)
    except Exception as e:  # zipfile/OSError/ValueError/KeyError/DataError: all mean "rebuild"
        warnings.warn(f"ignoring damaged cache {path}: {' '.join(str(e).split())}", stacklevel=3)
        return None
    return _dataset(name, arrays, "cache")


def _write_cache(path: Path, ds: Dataset) -> None:
    """Write ``ds`` as an uncompressed uint8 ``.npz``, atomically (temp file + os.replace)."""
    try:
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                train_images=ds.train_images.astype(np.uint8),
                train_labels=ds.train_labels.astype(np.uint8),
                test_images=ds.test_images.astype(np.uint8),
                test_labels=ds.test_labels.astype(np.uint8),
            )
    except OSError as e:
        warnings.warn(f"could not write cache {path}: {e}", stacklevel=3)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    use_cache: bool = True,
) -> Dataset:
    """Load ``name`` from its folder (see ``resolve_data_dir``), through the uint8 cache.

    ``source``: "tfds" (official archives only), "idx" (plain reader) or "auto" (tfds, and
    the IDX reader with a warning when tfds refuses the archives or cannot be imported).
    A cache hit returns ``source="cache"`` without importing TensorFlow. ``use_cache=False``
    neither reads nor writes the cache.
    """
    start = time.perf_counter()
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    folder = resolve_data_dir(data_dir, name)
    files = _find_idx_files(folder)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # tfds shuffles while preparing, so tfds- and idx-built caches differ in order: key both.
    origins = ("tfds", "idx") if source == "auto" else (source,)
    cache_path = {o: cache_dir / f"{name}-{o}-{_fingerprint(files)}.npz" for o in origins}

    ds = None
    if use_cache:
        ds = next(filter(None, (_read_cache(cache_path[o], name) for o in origins)), None)
    if ds is None:
        official = all(p.suffix == ".gz" for p in files.values())
        if source == "tfds" or (source == "auto" and official):
            try:
                ds = load_tfds(name, folder, cache_dir / "tfds")
            except _TfdsRefused as e:
                if source == "tfds":
                    raise
                warnings.warn(f"tfds refused {name} ({e}); reading the IDX files instead", stacklevel=2)
        if ds is None:
            ds = load_idx_folder(folder, name)
        if use_cache:
            _write_cache(cache_path[ds.source], ds)
    return dataclasses.replace(ds, load_seconds=time.perf_counter() - start)


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [0, 1], same shape (the tutorial's ``x / 255``)."""
    return np.asarray(images).astype(np.float32) / 255.0


def flatten_and_scale(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 images to (N, 784) float32 in [0, 1], as for the tutorial's MLP."""
    images = np.asarray(images)
    return scale(images.reshape(len(images), -1))


def to_categorical(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels (N,) to float32 one-hot rows (N, num_classes), like Keras'."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"label {bad.flat[0]} is outside 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float32)[labels]


def synthetic_digits(rng: np.random.Generator, n: int, noise: int = 40
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable toy digits for smoke runs and tests: uint8 images of uniform
    noise in [0, ``noise``) where class k lights up row block k; uint8 labels."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, noise, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 3: 2 * k + 6, 4:24] = 255
    return images, labels


def training_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples stay for training when ``fraction`` is held out for
    validation: Keras' ``floor(n * (1 - fraction))``."""
    return int(math.floor(n * (1.0 - fraction)))


def validation_split(
    images: np.ndarray, labels: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off the LAST ``fraction`` of the (unshuffled) data, like Keras' ``validation_split``.

    Returns ``(train_x, train_y, val_x, val_y)``; fraction 0 gives empty validation arrays.
    The cut is Keras' ``floor(n * (1 - fraction))``.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"validation fraction must be in [0, 1), got {fraction}")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    n = len(images)
    split_at = training_count(n, fraction)
    if fraction > 0 and split_at in (0, n):
        raise UsageError(f"{n} samples are too few to split off a validation fraction of {fraction}")
    return images[:split_at], labels[:split_at], images[split_at:], labels[split_at:]
