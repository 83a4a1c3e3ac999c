"""Several processes loading one dataset on a cold cache (issue #14.2), and a quiet first run
(issue #11.4): real processes, started together, each printing a hash of its arrays."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from mnist_jax.data import load_idx_folder

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_data_load_worker.py"
sys.path.insert(0, str(WORKER.parent))
from _data_load_worker import digest  # noqa: E402

WAITING = "mnist-jax: waiting for another process preparing mnist in "
OFFICIAL_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def start(cache: Path, *args: object, **env: str) -> subprocess.Popen:
    """A worker process loading mnist with ``cache`` as its cache."""
    env = {**os.environ, "MNIST_JAX_CACHE_DIR": str(cache), **env,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), "mnist", *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, list[str]]:
    """The worker's JSON record and stderr lines, after checking it exited 0."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err.strip().splitlines()


def make_synthetic(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data import make_folder

    return make_folder(folder, gz=False, n_train=20, n_test=10)  # IDX route, no tfds


def test_a_process_finding_the_lock_held_says_it_waits_then_loads(tmp_path):
    folder = make_synthetic(tmp_path / "m")
    cache = tmp_path / "cache"
    cache.mkdir()
    with FileLock(cache / ".mnist.lock"):  # another process is preparing mnist
        proc = start(cache, folder)
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        assert ready, "the worker printed nothing while the lock was held"
        assert proc.stderr.readline().rstrip("\n") == f"{WAITING}{cache}"
        time.sleep(0.5)
        assert proc.poll() is None and not list(cache.glob("*.npz"))  # still waiting
    record, lines = finish(proc)
    assert record["source"] == "idx" and lines == []
    assert record["sha256"] == digest(load_idx_folder(folder))


def test_processes_on_a_cold_cache_with_a_synthetic_folder_all_succeed(tmp_path):
    folder = make_synthetic(tmp_path / "m")
    procs = [start(tmp_path / "cache", folder) for _ in range(4)]
    results = [finish(p) for p in procs]
    assert {r["sha256"] for r, _ in results} == {digest(load_idx_folder(folder))}
    for _, lines in results:
        assert all(line.startswith(WAITING) for line in lines), lines


@pytest.mark.realdata
def test_processes_started_together_on_a_cold_cache_all_succeed_quietly(mnist_dir, tmp_path):
    cache = tmp_path / "cache"  # cold: no tfds store, no .npz
    procs = [start(cache, mnist_dir) for _ in range(3)]
    results = [finish(p) for p in procs]
    assert {r["sha256"] for r, _ in results} == {digest(load_idx_folder(mnist_dir))}
    assert sorted(r["source"] for r, _ in results) == ["cache", "cache", "tfds"]  # prepared once
    assert all(r["test_labels"] == OFFICIAL_TEST_LABELS for r, _ in results)
    for record, lines in results:
        # Only mnist-jax's own line: no TensorFlow, absl, oneDNN or tfds chatter.
        assert all(line.startswith(WAITING) for line in lines), "\n".join(lines)
    preparer = next(lines for r, lines in results if r["source"] == "tfds")
    assert preparer == []


@pytest.mark.realdata
def test_killed_during_preparation_then_a_new_run_prepares_again(mnist_dir, tmp_path):
    cache = tmp_path / "cache"
    victim = start(cache, mnist_dir)
    store = cache / "tfds" / "mnist"
    deadline = time.monotonic() + 300
    while not list(store.glob("incomplete.*")):  # tfds is writing its store
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "preparation never started"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not list(cache.glob("*.npz")) and not (store / "3.0.1").exists()

    record, lines = finish(start(cache, mnist_dir))  # the dead process's lock is free again
    assert record["source"] == "tfds" and lines == []
    assert record["sha256"] == digest(load_idx_folder(mnist_dir))
    assert not list(store.glob("incomplete.*"))  # what the killed run left is gone
    record, _ = finish(start(cache, mnist_dir))
    assert record["source"] == "cache"
