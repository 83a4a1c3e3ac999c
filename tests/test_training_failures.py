"""Training that goes wrong, through the CLI: divergence, Ctrl-C, a full disk, too little memory.

All on a small synthetic IDX folder (see test_bad_inputs), so each run takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_jax.checkpoint import Checkpointer
from mnist_jax.run import MEMORY_LIMIT_ENV, TrainingDiverged

from test_bad_inputs import make_data, run_cli, tree_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("failures") / "data")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_JAX_CACHE_DIR", str(tmp_path / "cache"))


def train_argv(data: Path, out: Path, *flags: object) -> list:
    return ["train", "--data-dir", data, "--out", out, "--batch-size", "32", "--quiet", *flags]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-jax: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_a_learning_rate_of_1e20_really_diverges_and_is_recorded(data, tmp_path, capfd):
    # Adam's first step moves every weight by ~lr: with 1e20 the logits overflow at step 1.
    run = tmp_path / "run"
    code, out, err = run_cli(train_argv(data, run, "--epochs", "3", "--lr", "1e20"), capfd)
    assert code == 1
    line = one_error_line(err)
    assert "training diverged" in line and "epoch 1, step 1" in line
    res = results(run)
    assert res["status"] == "diverged" and (res["epoch"], res["step"]) == (1, 1)
    assert res["epochs_completed"] == 0 and "epoch 1, step 1" in res["error"]
    assert not (run / "params.msgpack").exists()  # no trained model is claimed


def test_divergence_after_good_epochs_keeps_their_checkpoints_and_resume_continues(
        data, tmp_path, capfd, monkeypatch):
    """A NaN in epoch 3 (injected after two real epochs): epochs 1-2 stay usable."""
    import mnist_jax.run as run_mod
    real_fit = run_mod.fit

    def fit_that_diverges_in_epoch_3(config, dataset, *, on_epoch, **kwargs):
        def on_epoch_then_nan(epoch, st, row):
            on_epoch(epoch, st, row)
            if epoch == 2:
                raise TrainingDiverged(3, 5, st)
        return real_fit(config, dataset, on_epoch=on_epoch_then_nan, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(run_mod, "fit", fit_that_diverges_in_epoch_3)
    code, _, err = run_cli(train_argv(data, run, "--epochs", "4"), capfd)
    assert code == 1 and "epoch 3, step 5" in one_error_line(err)
    res = results(run)
    assert res["status"] == "diverged" and res["epochs_completed"] == 2
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest() == 2

    monkeypatch.setattr(run_mod, "fit", real_fit)
    code, out, err = run_cli(train_argv(data, run, "--epochs", "3", "--resume"), capfd)
    assert code == 0, err
    assert "resuming from the checkpoint of epoch 2" in out
    assert results(run)["status"] == "completed"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_ctrl_c_stops_cleanly_after_saving_and_resume_continues(data, tmp_path, capfd):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The CLI as in a terminal; a shell without job control (CI) may have started us with
    # SIGINT ignored, which the child would inherit: give it Python's Ctrl-C handler.
    cli_main = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from mnist_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", cli_main, *map(str, train_argv(data, run, "--epochs", "100000"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # the notice, then the outcome
    assert len(lines) == 2 and "stopping after the epoch in progress is saved" in lines[0], err
    assert "interrupted after epoch" in lines[1] and "--resume" in lines[1]
    res = results(run)
    done = res["epochs_completed"]
    assert res["status"] == "interrupted" and done >= 3
    assert len(metrics.read_text().splitlines()) == done
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest() == done

    code, out, err = run_cli(train_argv(data, run, "--epochs", done + 1, "--resume"), capfd)
    assert code == 0, err
    assert f"resuming from the checkpoint of epoch {done}" in out
    assert len(metrics.read_text().splitlines()) == done + 1, (out, metrics.read_text())
    assert results(run)["status"] == "completed"


def test_a_disk_that_fills_up_during_a_save_keeps_the_previous_checkpoint(
        data, tmp_path, capfd, monkeypatch):
    real_save = Checkpointer.save

    def save_until_full(self, epoch, state, meta, *, force=False):
        if epoch >= 2:
            raise OSError(errno.ENOSPC, f"cannot write checkpoint {self.step_dir(epoch)}: "
                                        f"{os.strerror(errno.ENOSPC)}")
        return real_save(self, epoch, state, meta, force=force)

    monkeypatch.setattr(Checkpointer, "save", save_until_full)
    run = tmp_path / "run"
    code, _, err = run_cli(train_argv(data, run, "--epochs", "3"), capfd)
    assert code == 1 and "No space left on device" in one_error_line(err)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    code, out, err = run_cli(train_argv(data, run, "--epochs", "2", "--resume"), capfd)
    assert code == 0 and "resuming from the checkpoint of epoch 1" in out, err


def test_a_batch_that_cannot_fit_is_refused_before_training_stating_the_bytes(
        data, tmp_path, capfd, monkeypatch):
    """A tiny artificial memory limit stands in for a huge batch on a small device."""
    run = tmp_path / "old"
    assert run_cli(train_argv(data, run, "--epochs", "1"), capfd)[0] == 0
    needed = results(run)["memory"]["needed_bytes"]
    assert results(run)["memory"]["available_bytes"] > needed > 0
    before = tree_digest(run)

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000000")
    code, _, err = run_cli(train_argv(data, run, "--epochs", "1", "--overwrite"), capfd)
    assert code == 2
    line = one_error_line(err)
    assert "--batch-size 32 does not fit" in line and "1,000,000 bytes" in line
    assert f"{needed:,} bytes" in line  # the same estimate the run recorded
    assert tree_digest(run) == before  # the run --overwrite would have replaced survives

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "a lot")
    code, _, err = run_cli(train_argv(data, tmp_path / "new", "--epochs", "1"), capfd)
    assert code == 2 and MEMORY_LIMIT_ENV in one_error_line(err)
    assert not (tmp_path / "new" / "config.json").exists()


def test_the_memory_estimate_grows_with_the_batch(data):
    from mnist_jax import TrainConfig, load_dataset
    from mnist_jax.run import check_training_fits

    ds = load_dataset("mnist", data)
    small = check_training_fits(TrainConfig(batch_size=16, hidden=(64,)), ds)
    large = check_training_fits(TrainConfig(batch_size=256, hidden=(64,)), ds)
    assert large["needed_bytes"] > small["needed_bytes"] > ds.train_images.nbytes
    assert small["available_bytes"] and small["memory_source"]
