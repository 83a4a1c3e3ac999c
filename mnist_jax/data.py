"""MNIST / Fashion-MNIST loading: the bytes of the folder given, in the official file order.

``load_dataset`` is the entry point. The four archives of a folder are hashed (SHA-256):
only archives whose hashes are the checksums tensorflow-datasets registers for the dataset
go through tfds (validated and prepared by it, returned in the archives' own order), and
anything else goes through the strict IDX reader with its one-line errors. With no folder,
tfds downloads the official archives into the cache, once. The loaded arrays are cached as
one uint8 ``.npz`` keyed by the archives' content; later runs read it with NumPy alone and
never import TensorFlow. Preparation is serialized across processes by a file lock, and
everything it writes appears atomically. The preprocessing helpers mirror the Keras MNIST
tutorial (``x / 255``, ``to_categorical``, ``validation_split``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mnist_jax.atomic import atomic_path
from mnist_jax.errors import DataError, UsageError, first_line
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
OFFLINE_HINT = (f"without a network, pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                "with the four official archives")


def url_env(name: str) -> str:
    """The variable naming a mirror of ``name``'s official archives: MNIST_JAX_<NAME>_URL.

    Set, tfds downloads ``<url>/train-images-idx3-ubyte.gz`` etc. from there instead of the
    URL its builder registers, and still validates the checksums it registers.
    """
    return f"MNIST_JAX_{name.upper()}_URL"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits of one dataset, in the official file order: images (N, 28, 28) uint8,
    labels (N,) int32."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # "tfds" (official bytes, prepared by tfds), "idx" or "cache"
    load_seconds: float = 0.0


class _TfdsRefused(DataError):
    """tfds cannot be used here (not the official bytes, or it/TensorFlow is not installed)."""


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
    return DataError(f"{path}: {first_line(problem)}")


def _read_bytes(path: Path) -> bytes:
    """The bytes of one data file; DataError (naming it) when missing, unreadable or empty."""
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
    return raw


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    """The uint8 array held by ``raw``, the bytes of the IDX file ``path`` (gzip or not)."""
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


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed or raw) into an array shaped by its header.

    Raises DataError (one line, naming the file) for a missing, unreadable, empty, corrupt
    or inconsistent file.
    """
    path = Path(path)
    return _parse_idx(path, _read_bytes(path))


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


def _idx_arrays(files: dict[str, Path], raw: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The four arrays parsed from the files' bytes, validated split by split."""
    arrays = {key: _parse_idx(path, raw[key]) for key, path in files.items()}
    for split in ("train", "test"):
        _check_split(
            arrays[f"{split}_images"], arrays[f"{split}_labels"],
            files[f"{split}_images"], files[f"{split}_labels"],
        )
    return arrays


def load_idx_folder(folder: str | os.PathLike[str], name: str = "mnist") -> Dataset:
    """Read and validate the four IDX files of ``folder`` with the plain reader."""
    files = _find_idx_files(Path(folder))
    raw = {key: _read_bytes(path) for key, path in files.items()}
    return _dataset(name, _idx_arrays(files, raw), "idx")


# ---------------------------------------------------------------- tfds: checksums, preparation
@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """Silence TensorFlow's C++ log, absl, tfds' prints and bars while tfds works.

    A user sees mnist-jax's own lines only; a real failure still arrives as an exception.
    """
    # Read once, when TensorFlow is imported; a user's own settings win. The oneDNN notice
    # ignores the log level, and oneDNN only changes float round-off in TF's ops, of which
    # tfds uses PNG decoding alone here.
    quiet_env = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
    set_env = [k for k in quiet_env if k not in os.environ]
    os.environ.update({k: quiet_env[k] for k in set_env})
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow", "tensorflow_datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    absl_logging = None
    try:
        from absl import logging as absl_logging

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    try:
        # tfds prints "Downloading and preparing dataset …" to stdout with termcolor.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if absl_logging is not None:
            absl_logging.set_verbosity(verbosity)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for k in set_env:
            os.environ.pop(k, None)


def _import_tfds():
    """tensorflow_datasets with its progress bars off; _TfdsRefused when it cannot be imported."""
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or a broken install failing while importing
        raise _TfdsRefused(f"tensorflow-datasets cannot be imported: {first_line(e)}") from e
    tfds.disable_progress_bar()  # one line of ours says what is loaded; theirs floods logs
    return tfds


def _registered_url_infos(name: str) -> dict[str, tuple[str, Any]]:
    """{file stem: (url, tfds UrlInfo)} for ``name``'s official archives, as tfds registers
    them (the URL moved to the mirror of ``url_env(name)`` when that is set)."""
    tfds = _import_tfds()
    try:
        infos = tfds.builder_cls(name).url_infos or {}
    except Exception as e:
        raise _TfdsRefused(f"tfds has no checksums for {name}: {first_line(e)}") from e
    mirror = os.environ.get(url_env(name), "").strip()
    found = {}
    for url, info in infos.items():
        filename = info.filename or Path(urllib.parse.urlparse(url).path).name
        stem = filename.removesuffix(".gz")
        if stem in IDX_FILES.values():
            found[stem] = (urllib.parse.urljoin(mirror.rstrip("/") + "/", filename) if mirror
                           else url, info)
    if len(found) != len(IDX_FILES):
        raise _TfdsRefused(f"tfds registers no checksums for the four {name} archives")
    return found


def registered_checksums(name: str) -> dict[str, str]:
    """{archive file name: SHA-256} that tensorflow-datasets registers for ``name``.

    Raises DataError when tfds cannot be imported.
    """
    return {f"{stem}.gz": info.checksum for stem, (_, info) in _registered_url_infos(name).items()}


def _is_official(name: str, files: dict[str, Path], digests: dict[str, str]) -> bool:
    """Whether the files are ``name``'s official archives, byte for byte."""
    sums = registered_checksums(name)
    return all(sums.get(files[k].name) == digests[k] for k in IDX_FILES)


class _NotOfficial(_TfdsRefused):
    """tfds refused the bytes themselves: they are not the official archives."""


def _not_official(name: str, folder: Path) -> _NotOfficial:
    return _NotOfficial(
        f"{folder}: the archives are not the official {name} bytes (their SHA-256 differs "
        "from the checksums tfds registers); use source='idx' to read them directly")


def _discard_incomplete(folder: Path, pattern: str) -> None:
    """Remove what an interrupted preparation left (the caller holds the dataset's lock)."""
    for path in folder.glob(pattern):
        shutil.rmtree(path, ignore_errors=True)


def _tfds_arrays(name: str, manual_dir: Path, tfds_data_dir: Path) -> dict[str, np.ndarray]:
    """Prepare ``name`` with tfds from the archives in ``manual_dir`` (tfds validates their
    checksums again), or reuse its prepared store, and return the four arrays in tfds'
    order. Any tfds failure becomes a one-line DataError."""
    tfds = _import_tfds()
    try:
        with _quiet_tensorflow():
            config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
            # tfds names extractions after the file alone, and both datasets' archives share
            # their names: one download folder per dataset keeps MNIST out of Fashion-MNIST.
            prepare = {"download_config": config,
                       "download_dir": str(tfds_data_dir / "downloads" / name)}
            splits = tfds.load(
                name,
                split=["train", "test"],
                data_dir=str(tfds_data_dir),
                batch_size=-1,
                as_supervised=True,
                download_and_prepare_kwargs=prepare,
            )
            (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    except ImportError as e:  # TensorFlow, imported lazily while preparing
        raise _TfdsRefused(f"TensorFlow cannot be imported: {first_line(e)}") from e
    except Exception as e:
        raise DataError(f"tfds could not prepare {name} from {manual_dir}: {first_line(e)}") from e
    return {"train_images": np.squeeze(train_x, -1), "train_labels": train_y,
            "test_images": np.squeeze(test_x, -1), "test_labels": test_y}


def _examples(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One split's (image, label) pairs as sorted byte rows: its contents, not its order."""
    rows = np.concatenate([np.asarray(images, np.uint8).reshape(len(images), -1),
                           np.asarray(labels, np.uint8).reshape(-1, 1)], axis=1)
    return np.sort(np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel())


def _prepared_by_tfds(name: str, folder: Path, arrays: dict[str, np.ndarray],
                      tfds_data_dir: Path) -> Dataset:
    """The official archives' ``arrays`` (file order), once tfds has prepared the same
    examples: tfds stores them shuffled, so the order comes from the archives, and a
    prepared store that holds anything else is refused."""
    prepared = _tfds_arrays(name, folder, tfds_data_dir)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        px, py = prepared[f"{split}_images"], prepared[f"{split}_labels"]
        if px.shape != x.shape or py.shape != y.shape or not np.array_equal(
                _examples(px, py), _examples(x, y)):
            raise DataError(
                f"{tfds_data_dir / name}: tfds' prepared {split} split differs from the "
                f"archives in {folder}; delete that folder and run again")
    return _dataset(name, arrays, "tfds")


def load_tfds(
    name: str, manual_dir: str | os.PathLike[str], tfds_data_dir: str | os.PathLike[str]
) -> Dataset:
    """``name`` from its official archives in ``manual_dir``, validated and prepared by
    tensorflow-datasets (the prepared store goes to ``tfds_data_dir``), in the file order.

    The archives' SHA-256 is checked against tfds' registered checksums before any prepared
    store is used. Raises DataError when they are not the official bytes or tfds/TensorFlow
    cannot be imported. Unlike ``load_dataset`` this takes no lock.
    """
    manual_dir = Path(manual_dir)
    missing = [f"{s}.gz" for s in IDX_FILES.values() if not (manual_dir / f"{s}.gz").is_file()]
    if missing:
        raise _fail(manual_dir, f"tfds needs the official .gz archives; missing {', '.join(missing)}")
    files = {key: manual_dir / f"{stem}.gz" for key, stem in IDX_FILES.items()}
    raw = {key: _read_bytes(path) for key, path in files.items()}
    if not _is_official(name, files, _digests(raw)):
        raise _not_official(name, manual_dir)
    return _prepared_by_tfds(name, manual_dir, _idx_arrays(files, raw), Path(tfds_data_dir))


# ---------------------------------------------------------------- folders, download, cache
def resolve_data_dir(data_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    """The folder holding ``name``'s files: ``data_dir``, else $MNIST_JAX_DATA_DIR, else None
    (no folder given: ``load_dataset`` downloads the official archives).

    A ``<dir>/<name>`` subfolder is preferred when present, so one root serves all datasets.
    """
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
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


def _acquire(name: str, cache_dir: Path):
    """``name``'s lock in ``cache_dir`` (a filelock), held; None when it cannot be made."""
    from filelock import FileLock, Timeout

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache_dir / f".{name}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"mnist-jax: waiting for another process preparing {name} in {cache_dir}",
                  file=sys.stderr, flush=True)
            lock.acquire()
    except OSError as e:  # a read-only cache: nothing of ours will be written there anyway
        warnings.warn(f"cannot lock {cache_dir} ({e}); preparing {name} without a lock",
                      stacklevel=4)
        return None
    return lock


@contextlib.contextmanager
def _preparing(name: str, cache_dir: Path) -> Iterator[None]:
    """Hold ``name``'s lock in ``cache_dir``: one process prepares, the others wait for it.
    The OS releases it when its holder dies, even by SIGKILL."""
    lock = _acquire(name, cache_dir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _complete(folder: Path) -> bool:
    return all((folder / f"{stem}.gz").is_file() for stem in IDX_FILES.values())


def _check_reachable(url: str) -> None:
    """Fail fast when the host cannot be reached (tfds retries a refused connection for
    minutes with backoff)."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=15).close()
    except OSError as e:
        raise DataError(f"cannot reach {parts.hostname}:{port} ({e.strerror or e})") from None


def download_archives(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder ``<cache>/archives/<name>`` holding ``name``'s four official archives,
    downloaded once by tfds' download manager (which validates the checksums it registers).

    The URL is tfds' own, or the mirror in ``url_env(name)``. A failed or offline download
    raises a one-line DataError that names what failed and the offline alternative.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / "archives" / name
    if _complete(folder):
        return folder
    with _preparing(name, cache_dir):
        if _complete(folder):  # another process downloaded them while we waited
            return folder
        _discard_incomplete(cache_dir, f"{name}.tmp.*")  # a download killed midway
        try:
            urls = _registered_url_infos(name)
            tfds = _import_tfds()
        except DataError as e:
            raise DataError(f"cannot download {name}: {e}; {OFFLINE_HINT}") from None
        where = next(iter(urls.values()))[0].rsplit("/", 1)[0]
        try:
            # tfds downloads the archives on threads that go on writing after one of them
            # failed: cleaning up must not replace that failure (a folder left behind is
            # discarded by the next download, under the lock).
            with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f"{name}.tmp.",
                                             ignore_cleanup_errors=True) as tmp:
                with _quiet_tensorflow():
                    _check_reachable(next(iter(urls.values()))[0])
                    manager = tfds.download.DownloadManager(
                        download_dir=tmp, url_infos={url: info for url, info in urls.values()},
                        dataset_name=name, force_checksums_validation=True)
                    paths = manager.download({stem: url for stem, (url, _) in urls.items()})
                for stem, path in paths.items():
                    with atomic_path(folder / f"{stem}.gz", durable=False) as dst:
                        shutil.copyfile(path, dst)
        except Exception as e:
            raise DataError(f"could not download {name} from {where}: {first_line(e).rstrip('.')}; "
                            f"{OFFLINE_HINT}") from None
    return folder


def _digests(raw: dict[str, bytes]) -> dict[str, str]:
    return {key: hashlib.sha256(data).hexdigest() for key, data in raw.items()}


def _content_key(digests: dict[str, str]) -> str:
    """The cache key: a hash of the four archives' bytes (their SHA-256s), nothing else."""
    h = hashlib.sha256()
    for key in IDX_FILES:
        h.update(f"{key}:{digests[key]}\n".encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path, name: str) -> tuple[Dataset, str] | None:
    """The cached dataset and the warning it was read with (see ``_load_uncached``), or None
    if absent; a damaged cache is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in IDX_FILES}
            note = str(z["note"]) if "note" in z.files else ""
        for split in ("train", "test"):
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.dtype != np.uint8 or y.dtype != np.uint8:
                raise ValueError("arrays are not uint8")
            _check_split(x, y, path, path)
    except Exception as e:  # zipfile/OSError/ValueError/KeyError/DataError: all mean "rebuild"
        warnings.warn(f"ignoring damaged cache {path}: {first_line(e)}", stacklevel=3)
        return None
    return _dataset(name, arrays, "cache"), note


def _write_cache(path: Path, ds: Dataset, note: str) -> None:
    """Write ``ds`` as an uncompressed uint8 ``.npz`` with ``note``, atomically (temp file +
    os.replace)."""
    try:
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                train_images=ds.train_images.astype(np.uint8),
                train_labels=ds.train_labels.astype(np.uint8),
                test_images=ds.test_images.astype(np.uint8),
                test_labels=ds.test_labels.astype(np.uint8),
                note=np.array(note),
            )
    except OSError as e:
        warnings.warn(f"could not write cache {path}: {e}", stacklevel=3)


def _load_uncached(name: str, folder: Path, files: dict[str, Path], raw: dict[str, bytes],
                   digests: dict[str, str], source: str,
                   tfds_data_dir: Path) -> tuple[Dataset, str]:
    """Read the folder's bytes: the strict IDX reader always (damaged archives are refused
    whatever else is on the machine), then tfds for the official archives.

    Returns the dataset and, for ``.gz`` archives that are not the official bytes, the
    warning to repeat whenever the cache serves them (it is kept with them)."""
    arrays = _idx_arrays(files, raw)
    if source == "idx":
        return _dataset(name, arrays, "idx"), ""
    if source == "auto" and not all(p.suffix == ".gz" for p in files.values()):
        return _dataset(name, arrays, "idx"), ""  # uncompressed files are never the official
    try:
        if not _is_official(name, files, digests):
            raise _not_official(name, folder)
        _discard_incomplete(tfds_data_dir / name, "incomplete.*")  # tfds' own, from a kill
        return _prepared_by_tfds(name, folder, arrays, tfds_data_dir), ""
    except _TfdsRefused as e:
        if source == "tfds":
            raise
        note = f"tfds refused {name} ({e}); the IDX reader read the files instead"
        warnings.warn(note, stacklevel=3)
        # a refusal of tfds itself (not installed, no checksums) is the machine's, not kept
        return _dataset(name, arrays, "idx"), note if isinstance(e, _NotOfficial) else ""


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    use_cache: bool = True,
) -> Dataset:
    """Load ``name`` from its folder (see ``resolve_data_dir``), through the uint8 cache.

    Whatever the route, the arrays are the bytes of that folder, in the official file
    order. With no folder given, tfds downloads the official archives into the cache first
    (``download_archives``). ``source``: "tfds" (official archives only, checked by SHA-256
    against tfds' registered checksums), "idx" (plain reader) or "auto" (tfds for the
    official archives, the IDX reader for anything else, with a warning for ``.gz`` archives
    that are not the official bytes). A cache hit, keyed by the archives' content, returns
    ``source="cache"`` without importing TensorFlow. ``use_cache=False`` neither reads nor
    writes the cache. Concurrent processes are safe: one prepares, the others wait for it.
    """
    start = time.perf_counter()
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = resolve_data_dir(data_dir, name)
    if folder is None:
        folder = download_archives(name, cache_dir)
    files = _find_idx_files(folder)
    raw = {key: _read_bytes(path) for key, path in files.items()}
    digests = _digests(raw)
    if source == "tfds" and not all(p.suffix == ".gz" for p in files.values()):
        raise _fail(folder, "tfds needs the official .gz archives")
    if source == "tfds" and not _is_official(name, files, digests):
        raise _not_official(name, folder)
    cache_path = cache_dir / f"{name}-{_content_key(digests)}.npz"

    hit = _read_cache(cache_path, name) if use_cache else None
    if hit is None:
        with _preparing(name, cache_dir):
            hit = _read_cache(cache_path, name) if use_cache else None  # made while we waited
            if hit is None:
                ds, note = _load_uncached(name, folder, files, raw, digests, source,
                                          cache_dir / "tfds")
                if use_cache:
                    _write_cache(cache_path, ds, note)
                hit = ds, ""  # already warned
    ds, note = hit
    if note:
        warnings.warn(f"{note} (served from the cache)", stacklevel=2)
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
