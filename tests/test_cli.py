"""The mnist-jax command line, happy paths: train → evaluate → predict → summary → report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_jax.cli import main
from mnist_jax.data import CACHE_DIR_ENV, DATA_DIR_ENV


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_dir, data_cache_dir, mnist):
    """One real epoch of the tutorial MLP, trained through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DATA_DIR_ENV, str(mnist_dir))
        mp.setenv(CACHE_DIR_ENV, str(data_cache_dir))
        code = main(["train", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture
def env(monkeypatch, mnist_dir, data_cache_dir):
    monkeypatch.setenv(DATA_DIR_ENV, str(mnist_dir))
    monkeypatch.setenv(CACHE_DIR_ENV, str(data_cache_dir))


@pytest.mark.realdata
def test_train_writes_the_run_folder(trained_run: Path):
    results = json.loads((trained_run / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["model"] == "mlp" and results["config"]["batch_size"] == 128
    assert results["test_accuracy"] >= 0.95
    for key in ("test_loss", "compile_seconds", "total_seconds", "epoch_seconds", "device",
                "versions", "git_commit"):
        assert key in results, key
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
            "epoch_seconds"} <= set(rows[0])
    # the epoch's 468 steps as ten stretches: the loss falls within the one epoch
    curve = rows[0]["train_loss_curve"]
    assert len(curve) == len(rows[0]["train_accuracy_curve"]) == 10
    assert curve[-1] < curve[0] and min(curve) <= rows[0]["train_loss"] <= max(curve)
    assert (trained_run / "params.msgpack").is_file()
    assert any((trained_run / "tb").iterdir())


@pytest.mark.realdata
def test_evaluate_reproduces_the_final_test_accuracy(trained_run, env, capsys):
    assert main(["evaluate", str(trained_run)]) == 0
    acc = json.loads((trained_run / "results.json").read_text())["test_accuracy"]
    assert f"test accuracy {acc:.4f}" in capsys.readouterr().out


@pytest.mark.realdata
def test_predict_prints_the_first_30_classes_of_the_test_set(trained_run, env, mnist, capsys):
    assert main(["predict", str(trained_run)]) == 0
    classes = [int(c) for c in capsys.readouterr().out.split()]
    assert len(classes) == 30
    # a 95%-accurate model gets most of the first 30 right
    assert sum(c == int(y) for c, y in zip(classes, mnist.test_labels[:30])) >= 25


@pytest.mark.realdata
def test_predict_on_idx_images_as_json(trained_run, env, mnist_dir, capsys):
    idx = mnist_dir / "t10k-images-idx3-ubyte.gz"
    assert main(["predict", str(trained_run), str(idx), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["classes"]) == 10_000


def test_summary_prints_the_keras_style_table(capsys):
    assert main(["summary", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "1,199,882" in out and "conv_0" in out


def test_summary_builds_the_model_train_would_from_the_same_flags(capsys):
    assert main(["summary", "--recipe", "best"]) == 0
    assert "bn_dense" in capsys.readouterr().out
    net = Path(__file__).parent / "assets" / "net.py"
    assert main(["summary", "--model", f"{net}:Net", "--model-args", '{"hidden": 32}']) == 0
    assert "14,482" in capsys.readouterr().out
    assert main(["summary", "--model", "cnn", "--model-args", '{"features": [0]}']) == 2
    assert "features" in capsys.readouterr().err


@pytest.mark.realdata
def test_refuses_to_overwrite_a_run(trained_run, env, capsys):
    before = (trained_run / "results.json").read_bytes()
    assert main(["train", "--epochs", "1", "--out", str(trained_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and len(err.splitlines()) == 1
    assert (trained_run / "results.json").read_bytes() == before


def test_usage_errors_are_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mnist_jax.cli", "train", "--epochs", "zero"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--epochs" in proc.stderr
    assert "Traceback" not in proc.stderr



_EXIT_CHILD = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from mnist_jax.cli import exit_now
atexit.register(lambda: print("atexit ran"))
def late():
    time.sleep(0.3)
    open(sys.argv[1], "w").write("written")
threading.Thread(target=late).start()
pool = ThreadPoolExecutor(2)  # left open: its idle workers must not hold the exit
print(pool.submit(lambda: "unflushed").result(), end=" ")
exit_now(3)
"""


def test_the_console_script_ends_as_the_interpreter_would(tmp_path):
    """``exit_now`` (the console script's end) skips only the teardown: the exit code, a
    running thread's file, the atexit handlers and unflushed output all arrive, and an
    executor left open does not hang it."""
    late = tmp_path / "late.txt"
    proc = subprocess.run([sys.executable, "-c", _EXIT_CHILD, str(late)], stdout=subprocess.PIPE,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 3
    assert late.read_text() == "written"
    assert proc.stdout == "unflushed atexit ran\n"


@pytest.mark.realdata
def test_a_log_gets_one_plain_line_per_epoch_and_evaluate_shows_keras_loss(env, tmp_path):
    """stderr that is no terminal (CI, ``> log``, nohup): Keras' verbose=2 lines, no bar
    redraws; the final line gives the exact loss and Keras' clipped figure side by side."""
    proc = subprocess.run([sys.executable, "-m", "mnist_jax.cli", "train", "--epochs", "3",
                           "--hidden", "32", "--batch-size", "512", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in epochs] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert all("test_acc" in line for line in epochs)
    final = next(line for line in proc.stdout.splitlines() if line.startswith("test loss"))
    assert "as Keras reports it" in final and "test accuracy" in final
