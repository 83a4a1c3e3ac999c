"""The command line keeps XLA's compiled programs in the cache folder: a second process
reads them back instead of compiling, and trains bitwise the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_data import make_folder  # noqa: E402


def train(tmp_path: Path, name: str, **env: str) -> Path:
    """A cold ``mnist-jax train`` process on a tiny synthetic folder; returns its run."""
    folder = tmp_path / "digits"
    if not folder.exists():
        make_folder(folder, gz=False, n_train=64, n_test=16)
    inherited = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {**inherited, "MNIST_JAX_CACHE_DIR": str(tmp_path / "cache"), **env,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "mnist_jax.cli", "train", "--model", "convnet",
                           "--data-dir", str(folder), "--epochs", "1", "--batch-size", "16",
                           "--out", str(run), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run


def test_a_second_process_reads_the_compiled_epoch_back_and_trains_the_same(tmp_path):
    # Every program is written, however fast it compiled: with the 0.2 s threshold a
    # program that compiled in 0.19 s in one process and 0.21 s in the next is written
    # only by the second, and that says nothing about reading back.
    every = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = train(tmp_path, "first", **every)
    entries = sorted(p.name for p in (tmp_path / "cache" / "xla").iterdir())
    assert any(name.startswith("jit_train_epoch-") for name in entries), entries
    second = train(tmp_path, "second", **every)
    # nothing new compiled for the same program, and the same bits trained
    assert sorted(p.name for p in (tmp_path / "cache" / "xla").iterdir()) == entries
    assert (second / "params.msgpack").read_bytes() == (first / "params.msgpack").read_bytes()


def test_the_cache_can_be_turned_off_or_pointed_elsewhere(tmp_path):
    train(tmp_path, "off", MNIST_JAX_XLA_CACHE="0")
    assert not (tmp_path / "cache" / "xla").exists()
    train(tmp_path, "theirs", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs-xla"))
    assert not (tmp_path / "cache" / "xla").exists()
    assert any((tmp_path / "theirs-xla").iterdir())  # the user's own folder is kept
