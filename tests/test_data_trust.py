"""The data trained on is the bytes of the folder given (issue #11.1): copies of the OFFICIAL
archives, each damaged one way, are refused with exit 1 and one line, although official
MNIST was prepared before in the same cache (a warm tfds store and a warm cache)."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mnist_jax import cli
from mnist_jax.data import IDX_FILES, load_dataset

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = (f"{s}.gz" for s in IDX_FILES.values())


def raw(folder: Path, name: str) -> bytes:
    return gzip.decompress((folder / name).read_bytes())


def put(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(gzip.compress(data, compresslevel=1))


def relabel(folder: Path, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    labels = np.frombuffer(raw(folder, name), np.uint8, offset=8)
    new = np.asarray(edit(labels.copy()), np.uint8)
    put(folder, name, struct.pack(">II", 0x801, len(new)) + new.tobytes())


# (id, damage(folder), words the one line must hold)
DAMAGE = [
    ("gzip-truncated", lambda f: (f / TRAIN_IMAGES).write_bytes((f / TRAIN_IMAGES).read_bytes()[:-300]),
     (TRAIN_IMAGES, "gzip")),
    ("not-gzip", lambda f: (f / TRAIN_LABELS).write_bytes(b"this is not gzip\n"),
     (TRAIN_LABELS, "gzip")),
    ("body-truncated", lambda f: put(f, TEST_IMAGES, raw(f, TEST_IMAGES)[:-100]),
     (TEST_IMAGES, "truncated")),
    ("wrong-magic", lambda f: put(f, TEST_IMAGES, b"\0\0\x0c\x03" + raw(f, TEST_IMAGES)[4:]),
     (TEST_IMAGES, "magic")),
    ("wrong-dimensions",
     lambda f: put(f, TEST_IMAGES, struct.pack(">IIII", 0x803, 10000, 28, 27)
                   + raw(f, TEST_IMAGES)[16:16 + 10000 * 28 * 27]),
     (TEST_IMAGES, "(N, 28, 28)")),
    ("label-out-of-range", lambda f: relabel(f, TEST_LABELS, lambda y: np.where(
        np.arange(len(y)) == 5, 10, y)), (TEST_LABELS, "label 10", "index 5")),
    ("fewer-labels-than-images", lambda f: relabel(f, TRAIN_LABELS, lambda y: y[:-5]),
     (TRAIN_LABELS, "59995 labels for 60000 images")),
    ("empty-file", lambda f: (f / TEST_LABELS).write_bytes(b""), (TEST_LABELS, "empty")),
]


def run_cli(argv: list, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.realdata
@pytest.mark.parametrize("damage", [d[1] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_official_archives_refused_with_a_warm_store(damage, mnist, mnist_dir,
                                                            data_cache_dir, tmp_path, capfd,
                                                            monkeypatch):
    assert mnist.source == "tfds" and (data_cache_dir / "tfds" / "mnist").is_dir()  # warm
    names = next(d[2] for d in DAMAGE if d[1] is damage)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        shutil.copyfile(mnist_dir / name, folder / name)
    damage(folder)
    monkeypatch.setenv("MNIST_JAX_CACHE_DIR", str(data_cache_dir))
    cached = sorted(data_cache_dir.glob("*.npz"))

    code, out, err = run_cli(["train", "--data-dir", folder, "--out", tmp_path / "run",
                              "--epochs", "1", "--quiet"], capfd)

    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("mnist-jax: error: "), err
    for word in names:
        assert word in lines[0], lines[0]
    assert sorted(data_cache_dir.glob("*.npz")) == cached  # nothing cached for it
    assert not (tmp_path / "run" / "params.msgpack").exists()


def test_a_copy_with_changed_labels_trains_on_its_own_labels_after_the_official_was_prepared(
        mnist, mnist_dir, data_cache_dir, tmp_path):
    """The bug of issue #11.1: valid MNIST-format archives with 6,000 training labels
    changed, read after the official ones were prepared in the same cache, came back as
    tfds' official labels. Now they are the copy's bytes, read by the IDX reader."""
    assert mnist.source == "tfds"  # the official folder, prepared: a warm store and cache
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    relabel(folder, TRAIN_LABELS, lambda y: np.where(np.arange(len(y)) < 6000, (y + 1) % 10, y))

    with pytest.warns(UserWarning, match="tfds refused mnist .* not the official mnist bytes"):
        copy = load_dataset("mnist", folder, cache_dir=data_cache_dir)
    with pytest.warns(UserWarning, match="not the official mnist bytes.*served from the cache"):
        again = load_dataset("mnist", folder, cache_dir=data_cache_dir)  # the cache says so too

    assert copy.source == "idx" and again.source == "cache"
    for ds in (copy, again):
        np.testing.assert_array_equal(ds.train_labels[:6000], (mnist.train_labels[:6000] + 1) % 10)
        np.testing.assert_array_equal(ds.train_labels[6000:], mnist.train_labels[6000:])
        np.testing.assert_array_equal(ds.train_images, mnist.train_images)
        np.testing.assert_array_equal(ds.test_labels, mnist.test_labels)
    # and the official folder still loads its own labels from the same cache
    np.testing.assert_array_equal(
        load_dataset("mnist", mnist_dir, cache_dir=data_cache_dir).train_labels, mnist.train_labels)

