"""Specification of mnist_jax.data: the IDX reader, the loaders, the cache, preprocessing."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mnist_jax import data
from mnist_jax.data import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    Dataset,
    default_cache_dir,
    flatten_and_scale,
    load_dataset,
    load_idx_folder,
    load_tfds,
    read_idx,
    resolve_data_dir,
    scale,
    to_categorical,
    validation_split,
)
from mnist_jax.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
STEMS = list(data.IDX_FILES.values())  # train images, train labels, test images, test labels


# ---------------------------------------------------------------- helpers
def write_idx(path: Path, array=None, *, magic=None, dims=None, payload=None) -> Path:
    """Write an IDX file (gzip if ``path`` ends in .gz); any part can be overridden to break it."""
    array = np.asarray(array if array is not None else [], dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    payload = array.tobytes() if payload is None else payload
    raw = struct.pack(f">I{len(dims)}I", magic, *dims) + payload
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_folder(folder: Path, *, gz: bool = True, n_train: int = 6, n_test: int = 4, **arrays) -> Path:
    """Four small valid IDX files; pass e.g. ``train_labels=...`` to replace one array."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    default = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) + 3) % 10,
    } | arrays
    for key, stem in data.IDX_FILES.items():
        write_idx(folder / (stem + ".gz" if gz else stem), default[key])
    return folder


def raised_message(excinfo: pytest.ExceptionInfo, *must_name: object) -> str:
    """The error's message, checked to be one line naming each of ``must_name``."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for name in must_name:
        assert str(name) in msg, msg
    return msg


# ---------------------------------------------------------------- read_idx
@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("shape", [(3, 28, 28), (7,), (2, 3, 4, 5)])
def test_read_idx_round_trips_gzip_and_raw(tmp_path, suffix, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / f"x{suffix}", array))
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, array)
    got[...] = 0  # a normal, writable array


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope.gz")
    raised_message(e, tmp_path / "nope.gz", "no such file")


def test_read_idx_directory(tmp_path):
    (tmp_path / "d.gz").mkdir()
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "d.gz")
    raised_message(e, tmp_path / "d.gz", "directory")


def test_read_idx_permission_denied(tmp_path, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reads: simulate the OS refusing.
    path = write_idx(tmp_path / "x.gz", np.zeros(3))

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", deny, raising=False)
    with pytest.raises(DataError) as e:
        read_idx(path)
    raised_message(e, path, "permission denied")


@pytest.mark.parametrize("name", ["empty.gz", "empty"])
def test_read_idx_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / name)
    raised_message(e, tmp_path / name, "empty file")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # download cut short
        lambda b: b[:-4],  # gzip trailer (size) missing
        lambda b: b"not gzip at all, just text",  # .gz name, other content
        lambda b: b[:-8] + bytes(8),  # CRC and size zeroed
    ],
    ids=["half", "no-trailer", "not-gzip", "bad-crc"],
)
def test_read_idx_corrupt_gzip(tmp_path, damage):
    path = write_idx(tmp_path / "x.gz", np.arange(200).reshape(2, 10, 10))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as e:
        read_idx(path)
    raised_message(e, path, "gzip")


@pytest.mark.parametrize(
    "magic", [0x00000D03, 0x00000903, 0x03080000, 0x00000800, 0x01000803], ids=hex
)
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_wrong_magic(tmp_path, magic, suffix):
    # float32, int8, little-endian written, zero dims, nonzero leading bytes
    path = write_idx(tmp_path / f"x{suffix}", np.zeros((2, 2, 2)), magic=magic, dims=(2, 2, 2))
    with pytest.raises(DataError) as e:
        read_idx(path)
    raised_message(e, path, "magic", f"0x{magic:08x}")


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_header_cut_short(tmp_path, suffix):
    short = write_idx(tmp_path / f"a{suffix}", payload=b"", magic=0x803, dims=())
    tiny = tmp_path / f"b{suffix}"
    tiny.write_bytes(gzip.compress(b"\0\0") if suffix else b"\0\0")
    for path in (short, tiny):
        with pytest.raises(DataError) as e:
            read_idx(path)
        raised_message(e, path)


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("delta,word", [(-1, "truncated"), (-784, "truncated"), (1, "trailing")])
def test_read_idx_payload_size_must_match_header(tmp_path, suffix, delta, word):
    array = np.ones((3, 28, 28), np.uint8)
    payload = array.tobytes()
    payload = payload[:delta] if delta < 0 else payload + bytes(delta)
    path = write_idx(tmp_path / f"x{suffix}", array, payload=payload)
    with pytest.raises(DataError) as e:
        read_idx(path)
    raised_message(e, path, word, 3 * 28 * 28)


# ---------------------------------------------------------------- load_idx_folder
@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_folder_reads_gz_or_uncompressed(tmp_path, gz):
    folder = make_folder(tmp_path / "m", gz=gz, train_labels=[0, 1, 2, 9, 9, 4])
    ds = load_idx_folder(folder, "fashion_mnist")
    assert isinstance(ds, Dataset) and ds.name == "fashion_mnist" and ds.source == "idx"
    assert ds.train_images.shape == (6, 28, 28) and ds.test_images.shape == (4, 28, 28)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.train_labels.tolist() == [0, 1, 2, 9, 9, 4]
    assert ds.test_labels.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("stem", STEMS)
def test_load_idx_folder_missing_file_names_file_and_folder(tmp_path, stem):
    folder = make_folder(tmp_path / "m")
    (folder / f"{stem}.gz").unlink()
    with pytest.raises(DataError) as e:
        load_idx_folder(folder)
    raised_message(e, folder, stem)


def test_load_idx_folder_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_idx_folder(tmp_path / "absent")
    raised_message(e, tmp_path / "absent")


@pytest.mark.parametrize("images", [np.zeros((6, 32, 32)), np.zeros((6, 784)), np.zeros((6, 28, 28, 1))])
def test_load_idx_folder_rejects_wrong_image_dimensions(tmp_path, images):
    folder = make_folder(tmp_path / "m", train_images=images)
    with pytest.raises(DataError) as e:
        load_idx_folder(folder)
    raised_message(e, folder / f"{STEMS[0]}.gz", "(N, 28, 28)")


def test_load_idx_folder_rejects_2d_labels(tmp_path):
    folder = make_folder(tmp_path / "m", test_labels=np.zeros((4, 1)))
    with pytest.raises(DataError) as e:
        load_idx_folder(folder)
    raised_message(e, folder / f"{STEMS[3]}.gz")


@pytest.mark.parametrize("split,labels", [("train", np.arange(5)), ("test", np.arange(7) % 10)])
def test_load_idx_folder_label_count_must_match_images(tmp_path, split, labels):
    folder = make_folder(tmp_path / "m", **{f"{split}_labels": labels})
    with pytest.raises(DataError) as e:
        load_idx_folder(folder)
    stem = STEMS[1] if split == "train" else STEMS[3]
    raised_message(e, folder / f"{stem}.gz", len(labels))


@pytest.mark.parametrize("bad", [10, 255])
def test_load_idx_folder_rejects_labels_outside_0_to_9(tmp_path, bad):
    folder = make_folder(tmp_path / "m", test_labels=[1, 2, bad, 3])
    with pytest.raises(DataError) as e:
        load_idx_folder(folder)
    raised_message(e, folder / f"{STEMS[3]}.gz", f"label {bad}", "index 2")


# ---------------------------------------------------------------- folders and cache location
def test_resolve_data_dir_explicit_env_and_subfolder(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None, "mnist") == tmp_path / "mnist"  # root/<name> preferred
    assert resolve_data_dir(None, "fashion_mnist") == tmp_path  # no subfolder: the root
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other, "mnist") == other  # the argument beats the environment


def test_resolve_data_dir_unset_means_download(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None, "mnist") is None


def test_resolve_data_dir_missing_folder_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        resolve_data_dir(tmp_path / "absent", "mnist")
    raised_message(e, tmp_path / "absent")


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "mnist_jax"


# ---------------------------------------------------------------- load_dataset and its cache
def test_load_dataset_rejects_unknown_name_and_source(tmp_path):
    with pytest.raises(UsageError, match="mnist, fashion_mnist"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UsageError, match="auto, tfds, idx"):
        load_dataset("mnist", tmp_path, source="keras")


def test_load_dataset_idx_then_cache(tmp_path):
    folder = make_folder(tmp_path / "data" / "mnist")
    first = load_dataset("mnist", tmp_path / "data", cache_dir=tmp_path / "c", source="idx")
    assert first.source == "idx" and first.load_seconds > 0
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    second = load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    assert second.source == "cache" and second.name == "mnist"
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))
    assert second.train_images.dtype == np.uint8 and second.train_labels.dtype == np.int32
    assert second.test_labels.dtype == np.int32
    uncached = load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx", use_cache=False)
    assert uncached.source == "idx"


def test_load_dataset_cache_stores_uint8(tmp_path):
    folder = make_folder(tmp_path / "m")
    load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    (cache,) = (tmp_path / "c").glob("*.npz")
    with np.load(cache) as z:
        assert {z[k].dtype for k in data.IDX_FILES} == {np.dtype(np.uint8)}
        assert sorted(z.files) == sorted([*data.IDX_FILES, "note"])
        assert str(z["note"]) == ""  # read as the user asked: nothing to repeat


def test_load_dataset_cache_keyed_by_content_not_names_sizes_or_times(tmp_path):
    folder = make_folder(tmp_path / "m", gz=False)
    load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    labels = folder / STEMS[1]
    stat = labels.stat()
    make_folder(folder, gz=False, train_labels=[9, 9, 9, 9, 9, 9])  # same size, other bytes
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time
    assert labels.stat().st_size == stat.st_size
    ds = load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    assert ds.source == "idx" and ds.train_labels.tolist() == [9] * 6
    # The same bytes elsewhere, under another time, are the same data: a cache hit.
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    os.utime(moved / STEMS[1], ns=(1, 1))
    again = load_dataset("mnist", moved, cache_dir=tmp_path / "c", source="idx")
    assert again.source == "cache" and again.train_labels.tolist() == [9] * 6


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"junk"], ids=["cut", "junk"])
def test_load_dataset_ignores_and_rebuilds_damaged_cache(tmp_path, damage):
    folder = make_folder(tmp_path / "m")
    load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    (cache,) = (tmp_path / "c").glob("*.npz")
    cache.write_bytes(damage(cache.read_bytes()))
    with pytest.warns(UserWarning, match="damaged cache"):
        ds = load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    assert ds.source == "idx"
    assert load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx").source == "cache"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_load_dataset_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch, exc):
    folder = make_folder(tmp_path / "m")

    def savez_then_fail(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise exc

    monkeypatch.setattr(np, "savez", savez_then_fail)
    if isinstance(exc, OSError):
        with pytest.warns(UserWarning, match="could not write cache"):
            assert load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx").source == "idx"
    else:
        with pytest.raises(KeyboardInterrupt):
            load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx")
    assert [p.name for p in (tmp_path / "c").iterdir()] == [".mnist.lock"]  # no cache, no temp
    monkeypatch.undo()
    assert load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx").source == "idx"
    assert load_dataset("mnist", folder, cache_dir=tmp_path / "c", source="idx").source == "cache"


def test_auto_falls_back_to_idx_without_tfds(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.warns(UserWarning, match="tfds refused.*cannot be imported"):
        ds = load_dataset("mnist", folder, cache_dir=tmp_path / "c")
    assert ds.source == "idx" and ds.train_images.shape == (6, 28, 28)
    with warnings.catch_warnings():  # tfds' absence was this machine's, not the bytes': not kept
        warnings.simplefilter("error")
        assert load_dataset("mnist", folder, cache_dir=tmp_path / "c").source == "cache"
    with pytest.raises(DataError, match="cannot be imported"):
        load_dataset("mnist", folder, cache_dir=tmp_path / "c2", source="tfds")


def test_auto_uses_idx_when_archives_are_uncompressed(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "m", gz=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # tfds must not even be tried
    assert load_dataset("mnist", folder, cache_dir=tmp_path / "c").source == "idx"
    with pytest.raises(DataError) as e:
        load_tfds("mnist", folder, tmp_path / "tfds")
    raised_message(e, folder, f"{STEMS[0]}.gz")


def test_tfds_rejects_non_official_archives(tmp_path):
    folder = make_folder(tmp_path / "m")  # valid IDX, but not the bytes tfds has checksums for
    with pytest.raises(DataError) as e:
        load_tfds("mnist", folder, tmp_path / "tfds")
    raised_message(e, folder, "not the official")
    with pytest.warns(UserWarning, match="not the official"):
        assert load_dataset("mnist", folder, cache_dir=tmp_path / "c").source == "idx"


# ---------------------------------------------------------------- preprocessing
def test_to_categorical():
    got = to_categorical(np.array([0, 3, 9, 3]))
    assert got.dtype == np.float32 and got.shape == (4, 10)
    np.testing.assert_array_equal(got.argmax(1), [0, 3, 9, 3])
    np.testing.assert_array_equal(got.sum(1), 1.0)
    assert to_categorical([1], num_classes=3).tolist() == [[0.0, 1.0, 0.0]]
    assert to_categorical(np.zeros(0, np.int32)).shape == (0, 10)


@pytest.mark.parametrize("labels", [[0, 10], [-1, 2], [1.5]])
def test_to_categorical_rejects_bad_labels(labels):
    with pytest.raises(DataError):
        to_categorical(np.array(labels))


def test_scale_and_flatten_and_scale():
    images = np.array([[[0, 51], [255, 102]]] * 3, np.uint8)  # (3, 2, 2)
    flat = flatten_and_scale(images)
    assert flat.dtype == np.float32 and flat.shape == (3, 4)
    np.testing.assert_allclose(flat[0], [0.0, 0.2, 1.0, 0.4], rtol=1e-6)
    assert flatten_and_scale(np.zeros((5, 28, 28), np.uint8)).shape == (5, 784)
    scaled = scale(images)
    assert scaled.dtype == np.float32 and scaled.shape == (3, 2, 2)
    assert scaled.min() == 0.0 and scaled.max() == 1.0


def test_validation_split_takes_the_last_fraction():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    tx, ty, vx, vy = validation_split(x, y, 0.2)
    assert ty.tolist() == list(range(8)) and vy.tolist() == [8, 9]
    np.testing.assert_array_equal(vx, x[8:])
    np.testing.assert_array_equal(tx, x[:8])
    # Keras cuts at floor(n * (1 - fraction)): 100 * (1 - 0.9) is 9.999..., so 9 train samples.
    assert len(validation_split(np.zeros(100), np.zeros(100), 0.9)[0]) == 9
    assert len(validation_split(np.zeros(60000), np.zeros(60000), 0.1)[2]) == 6000


def test_validation_split_zero_fraction_gives_empty_validation():
    x, y = np.zeros((10, 28, 28), np.uint8), np.zeros(10, np.int32)
    tx, ty, vx, vy = validation_split(x, y, 0.0)
    assert tx.shape == (10, 28, 28) and vx.shape == (0, 28, 28) and vy.shape == (0,)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_validation_split_rejects_fraction_outside_0_1(fraction):
    with pytest.raises(UsageError):
        validation_split(np.zeros(10), np.zeros(10), fraction)


def test_validation_split_too_few_samples():
    with pytest.raises(UsageError):
        validation_split(np.zeros(10), np.zeros(10), 0.9)  # Keras: floor(10 * 0.1) = 0 train


# ---------------------------------------------------------------- real data
def _pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[str, int]]:
    """(image hash, label) for every example, sorted: the dataset's contents without its order."""
    return sorted(zip((hashlib.sha1(x.tobytes()).hexdigest() for x in images), labels.tolist()))


@pytest.mark.realdata
def test_mnist_via_tfds(mnist):
    assert mnist.source == "tfds" and mnist.name == "mnist"
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_images.dtype == np.uint8 and mnist.test_images.dtype == np.uint8
    assert mnist.train_labels.dtype == np.int32 and mnist.test_labels.shape == (10000,)
    assert np.bincount(mnist.train_labels).tolist() == MNIST_TRAIN_COUNTS


def file_order_labels(folder: Path, stem: str, n: int = 10) -> list[int]:
    """The first ``n`` labels of an archive, read by hand: the official file order."""
    return list(gzip.decompress((folder / f"{stem}.gz").read_bytes())[8 : 8 + n])


@pytest.mark.realdata
def test_tfds_route_returns_the_official_file_order(mnist, mnist_dir):
    assert mnist.source == "tfds"
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # Keras, torchvision
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_labels[:30].tolist() == file_order_labels(mnist_dir, STEMS[3], 30)
    idx = load_idx_folder(mnist_dir)  # the whole of both splits, element for element
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(mnist, field), getattr(idx, field))


@pytest.mark.realdata
def test_tfds_store_holds_the_same_examples_shuffled(mnist, data_cache_dir):
    # tfds is in the loop: its prepared store holds exactly these examples, in its own order.
    tfds = pytest.importorskip("tensorflow_datasets")
    (test_x, test_y), = tfds.as_numpy(tfds.load("mnist", split=["test"], data_dir=str(
        data_cache_dir / "tfds"), batch_size=-1, as_supervised=True, download=False))
    assert _pairs(test_x[..., 0], test_y) == _pairs(mnist.test_images, mnist.test_labels)
    assert test_y[:10].tolist() != mnist.test_labels[:10].tolist()


@pytest.mark.realdata
def test_second_load_comes_from_cache(mnist, mnist_dir, data_cache_dir):
    again = load_dataset("mnist", mnist_dir, cache_dir=data_cache_dir)
    assert again.source == "cache"
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(again, field), getattr(mnist, field))
    assert again.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert again.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@pytest.mark.realdata
def test_warm_cache_load_never_imports_tensorflow(mnist, mnist_dir, data_cache_dir):
    code = (
        "import json, sys; from mnist_jax.data import load_dataset; "
        "ds = load_dataset('mnist', sys.argv[1], cache_dir=sys.argv[2]); "
        "print(json.dumps([ds.source, len(ds.train_images), "
        "'tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code, str(mnist_dir), str(data_cache_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["cache", 60000, False, False]


@pytest.mark.realdata
def test_fashion_mnist_auto_falls_back_to_idx(fashion_dir, tmp_path):
    with pytest.raises(DataError, match="not the official"):
        load_dataset("fashion_mnist", fashion_dir, cache_dir=tmp_path, source="tfds")
    with pytest.warns(UserWarning, match="tfds refused fashion_mnist"):
        ds = load_dataset("fashion_mnist", fashion_dir, cache_dir=tmp_path)
    assert ds.source == "idx" and ds.name == "fashion_mnist"
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    for split, stem in (("train", STEMS[1]), ("test", STEMS[3])):  # the official file order
        assert getattr(ds, f"{split}_labels")[:30].tolist() == file_order_labels(fashion_dir, stem, 30)
    with pytest.warns(UserWarning, match="not the official fashion_mnist.*served from the cache"):
        cached = load_dataset("fashion_mnist", fashion_dir, cache_dir=tmp_path)
    assert cached.source == "cache"
    np.testing.assert_array_equal(cached.train_labels, ds.train_labels)
    np.testing.assert_array_equal(cached.test_images, ds.test_images)


@pytest.mark.realdata
def test_a_folder_of_other_valid_archives_is_read_as_it_is(mnist, mnist_dir, data_cache_dir, tmp_path):
    # Issue #11: official MNIST is prepared in data_cache_dir (warm tfds store, warm cache);
    # a copy with 6,000 training labels changed must come back with ITS labels.
    copy = tmp_path / "mnist"
    copy.mkdir()
    for stem in STEMS:
        (copy / f"{stem}.gz").write_bytes((mnist_dir / f"{stem}.gz").read_bytes())
    labels = mnist.train_labels.copy()
    labels[:6000] = (labels[:6000] + 1) % 10
    write_idx(copy / f"{STEMS[1]}.gz", labels)
    with pytest.warns(UserWarning, match="not the official mnist"):
        ds = load_dataset("mnist", copy, cache_dir=data_cache_dir)
    assert ds.source == "idx"
    np.testing.assert_array_equal(ds.train_labels, labels)
    np.testing.assert_array_equal(ds.train_images, mnist.train_images)
    with pytest.warns(UserWarning, match="not the official mnist.*served from the cache"):
        again = load_dataset("mnist", copy, cache_dir=data_cache_dir)
    assert again.source == "cache"
    np.testing.assert_array_equal(again.train_labels, labels)
    official = load_dataset("mnist", mnist_dir, cache_dir=data_cache_dir)
    np.testing.assert_array_equal(official.train_labels, mnist.train_labels)
    with pytest.raises(DataError, match="not the official"):
        load_dataset("mnist", copy, cache_dir=data_cache_dir, source="tfds")


def test_tfds_is_not_asked_about_a_folder_read_with_the_idx_reader(tmp_path, monkeypatch):
    # Only official bytes go through tfds: a synthetic .gz folder never reaches tfds.load.
    tfds = pytest.importorskip("tensorflow_datasets")
    folder = make_folder(tmp_path / "m")

    def no_load(*args, **kwargs):
        raise AssertionError("tfds.load called for archives that are not the official ones")

    monkeypatch.setattr(tfds, "load", no_load)
    with pytest.warns(UserWarning, match="not the official"):
        assert load_dataset("mnist", folder, cache_dir=tmp_path / "c").source == "idx"


def test_registered_checksums_are_tfds_own():
    pytest.importorskip("tensorflow_datasets")
    sums = data.registered_checksums("mnist")
    assert sorted(sums) == sorted(f"{s}.gz" for s in STEMS)
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in sums.values())
    assert sums != data.registered_checksums("fashion_mnist")
