"""End to end through the real CLI: reproducible runs and checkpoints that resume exactly.

Every run here is ``mnist-jax train`` in a subprocess on real MNIST with a small
MLP (``--hidden 64``, 4 epochs, ~0.3-1 s per epoch). The subprocess is the CLI's
``main`` behind a few opt-in test hooks (:data:`HOOKS`, set through environment
variables) that mark when something happens, so that the test can SIGKILL the
process at a chosen point:

* mid-epoch: the compiled training epoch is wrapped so that, once epoch 3's
  program has been dispatched (JAX runs it asynchronously), the process marks
  that and hangs; the kill lands there, inside epoch 3, however fast the device
  (a kill timed by the clock came too late on a GPU, whose epochs take
  milliseconds). The test checks that nothing of epoch 3 reached the disk;
* mid-save: orbax's commit (the rename of ``epoch_N.orbax-checkpoint-tmp-*`` to
  ``epoch_N``) is held back for epoch 3, so the kill lands after every array of
  the checkpoint is written but before it is committed.

A resumed run must end with parameters (``params.msgpack``, byte for byte) and
metrics (``metrics.jsonl`` without the timings) identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.realdata

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mnist_jax"
SMALL = ["--hidden", "64", "--epochs", "4", "--seeds", "0", "--keep-checkpoints", "3", "--quiet"]
# A user's module with BatchNorm (its batch_stats are part of the state), trained on digits
# augmented on the device: both must resume exactly too. It trains on a synthetic folder of
# 4,096 digits (XLA's CPU convolution gradients are slow; 4 epochs of MNIST took 90 s of CI).
USER_BN = ["--model", f"{ROOT / 'tests' / 'assets' / 'net.py'}:Net", "--model-args",
           '{"features": [4, 8]}', "--augment", "rotation=10,translate=2", "--epochs", "4",
           "--seeds", "0", "--keep-checkpoints", "3", "--quiet"]
# The same with an NNX module (its BatchNorm statistics in model_state, its dropout keyed
# from the state).
NNX_BN = ["--model", f"{ROOT / 'tests' / 'assets' / 'nnx_net.py'}:Net", "--model-args",
          '{"features": [4, 8], "dropout": 0.2}', "--augment", "rotation=10,translate=2",
          "--epochs", "4", "--seeds", "0", "--keep-checkpoints", "3", "--quiet"]

# Runs the CLI with opt-in hooks (none of them changes what is computed or written).
HOOKS = r"""
import os, sys, time

markers = os.environ.get("MJT_MARKERS")

def mark(name):
    with open(os.path.join(markers, name), "w"):
        pass

stall = os.environ.get("MJT_STALL_COMMIT")  # e.g. "epoch_3": never commit that checkpoint
if stall:
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == stall:
            mark("commit-" + stall)
            time.sleep(3600)  # killed here: the temporary directory is complete, not committed
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize

stall_epoch = os.environ.get("MJT_STALL_EPOCH")  # e.g. "3": hang once its program is dispatched
if stall_epoch:
    import mnist_jax.run as run

    compile_ = run._timed_compile
    count = {"compiles": 0, "epochs": 0}

    def timed_compile(fn, *args):
        compiled, seconds = compile_(fn, *args)
        count["compiles"] += 1
        if count["compiles"] > 1:  # fit compiles the training epoch first, then evaluation
            return compiled, seconds

        def epoch(*a):
            out = compiled(*a)
            count["epochs"] += 1
            if count["epochs"] == int(stall_epoch):
                mark("dispatched-epoch_" + stall_epoch)
                time.sleep(3600)  # killed here: epoch 3 runs or has run, nothing of it is saved
            return out

        return epoch, seconds

    run._timed_compile = timed_compile

if os.environ.get("MJT_NO_UNPICKLE"):  # loading a checkpoint or parameters must never unpickle
    import contextlib, pickle, _pickle
    import mnist_jax.checkpoint as ckpt

    def refuse(*args, **kwargs):
        mark("unpickled")
        raise AssertionError("unpickling attempted while loading a checkpoint or parameters")

    @contextlib.contextmanager
    def no_unpickling():  # only around loading: tensorboardX's writer queue pickles its events
        saved = [(m, n, getattr(m, n)) for m in (pickle, _pickle)
                 for n in ("load", "loads", "Unpickler")]
        for m, n, _ in saved:
            setattr(m, n, refuse)
        try:
            yield
        finally:
            for m, n, v in saved:
                setattr(m, n, v)

    def guarded(fn):
        def call(*args, **kwargs):
            with no_unpickling():
                mark("guarded-" + fn.__name__)
                return fn(*args, **kwargs)
        return call

    ckpt.Checkpointer.restore = guarded(ckpt.Checkpointer.restore)
    ckpt.load_params = guarded(ckpt.load_params)

from mnist_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, MJT_MARKERS=str(tmp_path),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


def _cli(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", HOOKS, *args], env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _start(tmp_path: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOOKS, *args], env=_env(tmp_path, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_seconds")
    return rows


def _epochs_recorded(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _checkpoints(run: Path) -> list[str]:
    d = run / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> Path:
    """An uninterrupted run of the SMALL config."""
    tmp = tmp_path_factory.mktemp("reference")
    _cli(tmp, "train", *SMALL, "--data-dir", str(mnist_dir), "--out", str(tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def bn_digits(tmp_path_factory) -> Path:
    """The USER_BN config's folder: 4,096 synthetic training digits, 512 test digits."""
    from test_data import make_folder
    return make_folder(tmp_path_factory.mktemp("bn_digits"), gz=False, n_train=4096, n_test=512)


@pytest.fixture(scope="module")
def user_bn_reference(tmp_path_factory, bn_digits) -> Path:
    """An uninterrupted run of the USER_BN config."""
    tmp = tmp_path_factory.mktemp("reference_bn")
    _cli(tmp, "train", *USER_BN, "--data-dir", str(bn_digits), "--out", str(tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def nnx_bn_reference(tmp_path_factory, bn_digits) -> Path:
    """An uninterrupted run of the NNX_BN config."""
    tmp = tmp_path_factory.mktemp("reference_nnx")
    _cli(tmp, "train", *NNX_BN, "--data-dir", str(bn_digits), "--out", str(tmp / "run"))
    return tmp / "run"


def test_same_config_and_seed_give_bitwise_identical_runs_and_results_record_provenance(
        reference, mnist_dir, tmp_path):
    _cli(tmp_path, "train", *SMALL, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "again"))
    again = tmp_path / "again"
    assert (again / "params.msgpack").read_bytes() == (reference / "params.msgpack").read_bytes()
    assert _metrics(again) == _metrics(reference)
    assert len(_metrics(reference)) == 4

    results = json.loads((reference / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs_completed"] == 4
    config = results["config"]
    assert config["hidden"] == [64] and config["seeds"] == [0] and config["epochs"] == 4
    assert config == json.loads((reference / "config.json").read_text())
    import jax
    assert results["versions"]["jax"] == jax.__version__
    for pkg in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "mnist-jax"):
        assert results["versions"][pkg], pkg
    assert results["device"]["platform"] == jax.devices()[0].platform
    assert results["device"]["count"] >= 1
    commit = results["git_commit"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) and commit.startswith(head[:40])
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_loss"] > 0


@pytest.mark.parametrize("case", ["mlp", "user-batchnorm-augmented", "nnx-batchnorm-augmented"])
def test_killed_mid_epoch_then_resumed_ends_bitwise_equal(case, request, mnist_dir, tmp_path):
    config, reference, folder = {
        "mlp": lambda: (SMALL, request.getfixturevalue("reference"), mnist_dir),
        "user-batchnorm-augmented": lambda: (USER_BN, request.getfixturevalue("user_bn_reference"),
                                             request.getfixturevalue("bn_digits")),
        "nnx-batchnorm-augmented": lambda: (NNX_BN, request.getfixturevalue("nnx_bn_reference"),
                                            request.getfixturevalue("bn_digits")),
    }[case]()
    run = tmp_path / "run"
    args = ["train", *config, "--data-dir", str(folder), "--out", str(run)]
    proc = _start(tmp_path, *args, MJT_STALL_EPOCH="3")
    _wait_for(lambda: (tmp_path / "dispatched-epoch_3").exists(), proc, "epoch 3's dispatch")
    _kill(proc)
    # It died inside epoch 3: epochs 1-2 recorded and checkpointed, nothing of epoch 3.
    assert _epochs_recorded(run) == 2
    assert _checkpoints(run) == ["epoch_1", "epoch_2"], _checkpoints(run)
    assert not (run / "params.msgpack").exists()

    out = _cli(tmp_path, *args, "--resume", MJT_NO_UNPICKLE="1").stdout
    assert "resuming from the checkpoint of epoch 2" in out
    assert (tmp_path / "guarded-restore").exists() and not (tmp_path / "unpickled").exists()
    assert (run / "params.msgpack").read_bytes() == (reference / "params.msgpack").read_bytes()
    assert _metrics(run) == _metrics(reference)
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    if case != "mlp":  # the saved variables hold the BatchNorm statistics, trained
        from mnist_jax.checkpoint import load_params
        saved = load_params(run / "params.msgpack")
        stats = (saved["batch_stats"]["BatchNorm_0"] if case.startswith("user")
                 else saved["nnx_state"]["norms"]["0"])
        assert not np.allclose(stats["var"], 1.0)


def test_killed_mid_save_with_a_damaged_newest_checkpoint_resumes_from_the_previous_one(
        reference, mnist_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", *SMALL, "--data-dir", str(mnist_dir), "--out", str(run)]
    proc = _start(tmp_path, *args, MJT_STALL_COMMIT="epoch_3")
    _wait_for(lambda: (tmp_path / "commit-epoch_3").exists(), proc, "epoch 3's checkpoint commit")
    _kill(proc)
    names = _checkpoints(run)
    assert names[:2] == ["epoch_1", "epoch_2"] and len(names) == 3, names
    assert re.fullmatch(r"epoch_3\.orbax-checkpoint-tmp.*", names[2]), names  # written, uncommitted
    assert _epochs_recorded(run) == 2

    # Damage the newest committed checkpoint as a crash of the disk might: truncate its arrays.
    arrays = [p for p in (run / "checkpoints" / "epoch_2" / "state").rglob("*")
              if p.is_file() and p.stat().st_size > 0 and "METADATA" not in p.name.upper()]
    assert arrays
    for p in arrays:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    done = _cli(tmp_path, *args, "--resume", MJT_NO_UNPICKLE="1")
    assert "resuming from the checkpoint of epoch 1" in done.stdout
    assert re.search(r"checkpoint \S*epoch_2 is unusable .*falling back", done.stderr), done.stderr
    assert (run / "params.msgpack").read_bytes() == (reference / "params.msgpack").read_bytes()
    assert _metrics(run) == _metrics(reference)
    left = _checkpoints(run)
    assert not any("tmp" in n for n in left), left  # the killed save's leftovers are gone
    assert left == ["epoch_2", "epoch_3", "epoch_4"], left

    # Reading the finished run back never unpickles either.
    ev = _cli(tmp_path, "evaluate", str(run), "--data-dir", str(mnist_dir), MJT_NO_UNPICKLE="1")
    acc = json.loads((run / "results.json").read_text())["test_accuracy"]
    assert f"test accuracy {acc:.4f}" in ev.stdout
    assert (tmp_path / "guarded-load_params").exists() and not (tmp_path / "unpickled").exists()


def test_the_package_never_uses_pickle():
    """Loading checkpoints and parameter files must never execute code: no pickle anywhere
    (the runs above also load with unpickling disabled)."""
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|_pickle|dill|cloudpickle|joblib|marshal|shelve)\b"
                         r"|\b(c?pickle|dill|joblib|marshal|shelve)\.\w+\(|allow_pickle\s*=\s*True"
                         r"|__import__\(\s*['\"](c?pickle|dill)")
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in sorted(PACKAGE.rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, "\n".join(offenders)
    assert pattern.search("import pickle") and pattern.search("np.load(f, allow_pickle=True)")
