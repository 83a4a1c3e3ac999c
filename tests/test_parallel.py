"""Data parallelism over devices and processes (subprocesses with forced CPU devices).

* 1 vs 8 devices: same parameters after 300 steps, to a float32 tolerance;
* a batch that does not split over the devices: exit 2, one line; ``--devices 4``;
* two processes (gloo on 127.0.0.1) end bitwise/tolerance-equal to one process
  with two devices; a killed process makes the other fail within a bound.

Tolerance (1 vs 8 devices): the gradient is summed in another order (8 partial
sums, then an all-reduce), which changes float32 rounding by ~1 ulp per step;
Adam divides by sqrt(v) and so amplifies tiny differences in small gradients.
Measured on real MNIST (MLP 784-128-10, dropout 0.4, batch 128, 300 steps):
max |Δ| = 4.6e-7 on parameters of size up to 0.3 (max relative 1.2e-4 with a
1e-3 floor). ``atol=1e-5, rtol=1e-4`` leaves a 20x margin; a real sharding bug
(wrong shuffle, unaveraged gradients) moves parameters by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_parallel_worker.py"
ATOL, RTOL = 1e-5, 1e-4


def _env(devices: int | None = None) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[k] for k in sorted((k for k in z.files if k.startswith("arr_")),
                                     key=lambda k: int(k[4:]))]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _real_flag() -> list[str]:
    return ["--real"] if os.environ.get("MNIST_JAX_DATA_DIR") else []


def test_one_four_and_eight_devices_train_the_same_model(tmp_path):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, str(WORKER), str(out), "--devices", "1,4,8",
                        "--train", str(128 * 300), *_real_flag()],
                       env=_env(8), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    done = {d["devices"]: d for d in _json_lines(r.stdout) if d.get("done")}
    assert "'data': 4" in done[4]["train_sharding"]  # --devices 4 uses 4 of the 8
    assert "'data': 8" in done[8]["train_sharding"]
    one, eight = _params(tmp_path / "p-1.npz"), _params(tmp_path / "p-8.npz")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one, eight))
    print(f"max |params(1 device) - params(8 devices)| = {diff:.3g}")  # the figure above
    for a, b in zip(one, eight):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL)



@pytest.mark.parametrize("net, args", [
    ("net.py", '{"features": [8, 16]}'),
    ("nnx_net.py", '{"features": [8, 16], "dropout": 0.1}'),
], ids=["linen", "nnx"])
def test_a_user_model_with_batchnorm_trains_the_same_on_one_and_eight_devices(net, args,
                                                                              tmp_path):
    """BatchNorm's batch statistics are computed over the GLOBAL batch when it is sharded
    (XLA reduces them across devices), so 8 devices train what 1 device trains, statistics
    included, up to float32 summation order; with augmentation drawn on the device too.
    Adam divides each gradient by its own running size, so where a gradient is near zero
    its rounding noise becomes a step of up to the learning rate (1e-3): over 8 steps a
    handful of elements drift by more than float32 tolerance, never by more than 8 steps.
    Per-device statistics of 16 examples would move most elements at once. The same for
    the linen module and its NNX twin (BatchNorm's statistics in model_state)."""
    out = tmp_path / "bn"
    net = f"{ROOT / 'tests' / 'assets' / net}:Net"
    r = subprocess.run([sys.executable, str(WORKER), str(out), "--devices", "1,8",
                        "--train", str(128 * 8), "--model", net, "--model-args",
                        args, "--augment", "translate=2", *_real_flag()],
                       env=_env(8), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    one, eight = _params(tmp_path / "bn-1.npz"), _params(tmp_path / "bn-8.npz")
    assert len(one) == len(eight) > 6  # conv kernels, BatchNorm scale/bias AND mean/var, dense
    for a, b in zip(one, eight):
        close = np.isclose(b, a, atol=ATOL, rtol=RTOL)
        assert close.mean() >= 0.999, (a.shape, close.mean())
        np.testing.assert_allclose(b, a, atol=8 * 1e-3)


def test_the_compiled_epoch_shards_the_batch_and_all_reduces_the_gradient():
    code = """
import re, jax, numpy as np
from mnist_jax import parallel
from mnist_jax.config import TrainConfig
from mnist_jax.run import init_state
from mnist_jax.training import compile_fns
for seeds in [(0,), (0, 1)]:
    cfg = TrainConfig(batch_size=128, hidden=(32,), seeds=seeds)
    mesh = parallel.make_data_mesh()
    state = parallel.replicate(init_state(cfg), mesh)
    x = parallel.replicate(np.zeros((512, 28, 28), np.uint8), mesh)
    y = parallel.replicate(np.zeros((512,), np.int32), mesh)
    fns = compile_fns(128, cfg.num_models, parallel.batch_sharding(mesh))
    hlo = fns.train_epoch.lower(state, x, y).compile().as_text()
    assert re.search(r"all-reduce\\(", hlo), "no gradient all-reduce"
    assert re.search(r"\\[(\\d+,)?16,(784|28,28)\\]", hlo), "the batch is not split into 8 x 16"
    assert not re.search(r"\\[(\\d+,)?128,(784|28,28)\\]", hlo), "a device sees the whole batch"
    s, m = fns.train_epoch(state, x, y)
    assert all(l.sharding.is_fully_replicated for l in jax.tree.leaves(s.params))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not os.environ.get("MNIST_JAX_DATA_DIR"), reason="needs MNIST_JAX_DATA_DIR")
def test_batch_that_does_not_split_over_the_devices_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mnist_jax.cli", "train", "--batch-size", "100",
                        "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")],
                       env=_env(8), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--batch-size 100" in err[0] and "8 devices" in err[0], err


def _two_processes(cmd, tmp_path, env=None, **popen):
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(tmp_path / f"proc{i}.log", "w")
        procs.append(subprocess.Popen([*cmd, "--coordinator", f"127.0.0.1:{port}",
                                       "--num-processes", "2", "--process-id", str(i)],
                                      env=env or _env(1), stdout=log, stderr=subprocess.STDOUT,
                                      text=True, **popen))
    return procs


@pytest.mark.parametrize("seeds", ["0", "0,1"])  # one model, and a stacked state
def test_two_processes_train_like_one_process_with_two_devices(tmp_path, seeds):
    args = ["--train", "4096", "--epochs", "1", "--seeds", seeds]
    procs = _two_processes([sys.executable, str(WORKER), str(tmp_path / "two"), *args],
                           tmp_path)
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one"), *args],
                            env=_env(2), capture_output=True, text=True, timeout=120)
    codes = [p.wait(timeout=120) for p in procs]
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert single.returncode == 0, single.stderr[-2000:]
    losses = [[d["train_loss"] for d in _json_lines(text) if "train_loss" in d] for text in logs]
    assert losses[0] == losses[1]  # every process computes the same metrics
    with np.load(tmp_path / "two-2.npz") as z:
        assert int(z["processes"]) == 2
    for a, b in zip(_params(tmp_path / "one-2.npz"), _params(tmp_path / "two-2.npz")):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not os.environ.get("MNIST_JAX_DATA_DIR"), reason="needs MNIST_JAX_DATA_DIR")
def test_a_killed_process_makes_the_other_fail_quickly(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mnist_jax.cli", "train", "--epochs", "50", "--hidden", "32",
           "--batch-size", "256", "--quiet", "--out", str(run), "--heartbeat-timeout", "10"]
    procs = _two_processes(cmd, tmp_path)
    metrics = run / "metrics.jsonl"
    try:
        for _ in range(750):  # up to ~150 s for the first epoch (compilation on a busy CI box)
            if metrics.is_file() and metrics.read_text().strip():
                break
            assert all(p.poll() is None for p in procs), (tmp_path / "proc0.log").read_text()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the two processes never finished an epoch")
        procs[1].send_signal(signal.SIGKILL)
        # Bounded failure, not a speed claim: a hang (the bug this guards) would raise
        # TimeoutExpired; the heartbeat timeout is 10 s, gloo's peer-loss error is immediate.
        code = procs[0].wait(timeout=40)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "proc0.log").read_text()
    assert code != 0, log[-2000:]
    assert "lost contact" in log or "heartbeat" in log.lower(), log[-2000:]
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() \
        else None
    if results is not None:
        assert results["status"] == "failed"
    # the last complete checkpoint (process 0 writes them alone) survives the crash
    from mnist_jax.checkpoint import Checkpointer
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest() is not None and ckpt.latest() >= 1


@pytest.mark.skipif(not os.environ.get("MNIST_JAX_DATA_DIR"), reason="needs MNIST_JAX_DATA_DIR")
def test_a_two_process_run_on_one_host_with_a_cold_cache_trains(tmp_path, mnist, data_cache_dir):
    """Both processes load MNIST at once into a cache without it (one prepares, the other
    waits on the cache's lock), then train together; process 0 writes the run. The cache
    holds tfds' prepared store, hard-linked from the session's: tfds' own first preparation
    (~45 s) on a cold cache is test_data_concurrency's subject."""
    run, cache = tmp_path / "run", tmp_path / "cold-cache"
    shutil.copytree(data_cache_dir / "tfds", cache / "tfds", copy_function=os.link)
    cmd = [sys.executable, "-m", "mnist_jax.cli", "train", "--epochs", "1", "--hidden", "32",
           "--batch-size", "256", "--quiet", "--out", str(run)]
    procs = _two_processes(cmd, tmp_path, env={**_env(1), "MNIST_JAX_CACHE_DIR": str(cache)})
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["device"]["process_count"] == 2
    assert results["test_accuracy"] > 0.9
    assert len(list(cache.glob("mnist-*.npz"))) == 1  # prepared once, shared
