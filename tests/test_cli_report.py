"""Several models in one run through the CLI: results.json, metrics.jsonl, TensorBoard, report."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from mnist_jax.checkpoint import load_params
from mnist_jax.cli import main
from mnist_jax.training import default_model_axis

pytestmark = pytest.mark.realdata

SEEDS, LRS = (0, 1), (1e-3, 3e-4)
SWEEP = ["--hidden", "64", "--epochs", "2", "--seeds", "0,1", "--lr", "1e-3,3e-4", "--quiet"]


def read_events(path: Path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing, CRCs not checked)."""
    from tensorboardX.proto import event_pb2

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos: pos + 8])
        pos += 12  # length + its CRC
        event = event_pb2.Event()
        event.ParseFromString(data[pos: pos + length])
        events.append(event)
        pos += length + 4  # payload + its CRC
    return events


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_dir) -> Path:
    run = tmp_path_factory.mktemp("sweep") / "run"
    assert main(["train", *SWEEP, "--data-dir", str(mnist_dir), "--out", str(run)]) == 0
    return run


def test_results_hold_every_model_and_their_mean_and_std(sweep):
    results = json.loads((sweep / "results.json").read_text())
    grid = [(m["seed"], m["lr"]) for m in results["per_model"]]
    assert grid == [(s, lr) for s in SEEDS for lr in LRS]
    accs = [m["test_accuracy"] for m in results["per_model"]]
    losses = [m["test_loss"] for m in results["per_model"]]
    assert results["test_accuracy"] == accs and results["test_loss"] == losses
    assert results["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert results["test_accuracy_std"] == pytest.approx(np.std(accs))
    assert results["test_loss_mean"] == pytest.approx(np.mean(losses))
    assert results["test_loss_std"] == pytest.approx(np.std(losses))
    assert all(0.85 < a <= 1.0 for a in accs) and len(set(accs)) > 1

    rows = [json.loads(line) for line in (sweep / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_accuracy"] == pytest.approx(accs)
    assert rows[0]["models"] == [{"seed": s, "lr": lr} for s in SEEDS for lr in LRS]
    variables = load_params(sweep / "params.msgpack")
    assert variables["params"]["dense_0"]["kernel"].shape == (4, 784, 64)


def test_model_i_of_a_sweep_is_the_run_of_its_seed_and_lr_alone(sweep, mnist_dir, tmp_path):
    """One compiled program for all models, same result as training model 3 on its own."""
    alone = tmp_path / "alone"
    assert main(["train", *SWEEP[:4], "--seeds", "1", "--lr", "3e-4", "--quiet",
                 "--checkpoint-every", "0", "--data-dir", str(mnist_dir), "--out", str(alone)]) == 0
    many = load_params(sweep / "params.msgpack")["params"]
    one = load_params(alone / "params.msgpack")["params"]
    for layer in one:
        for name, value in one[layer].items():
            if default_model_axis() == "map":  # the models run one after another: bitwise
                np.testing.assert_array_equal(many[layer][name][3], value)
            else:  # batched kernels may sum in another order
                np.testing.assert_allclose(many[layer][name][3], value, rtol=1e-4, atol=1e-5)


def test_the_ensemble_accuracy_is_that_of_the_models_mean_probability(sweep, mnist):
    import mnist_jax as mj

    loaded = mj.load_run(sweep)
    probs = np.mean([mj.predict(loaded.model_state(i), mnist.test_images)
                     for i in range(len(SEEDS) * len(LRS))], axis=0)
    ensemble = float(np.mean(probs.argmax(-1) == mnist.test_labels))
    results = json.loads((sweep / "results.json").read_text())
    assert results["ensemble_test_accuracy"] == pytest.approx(ensemble, abs=1e-4)
    assert results["test_accuracy_min"] == min(results["test_accuracy"])


def test_tensorboard_events_hold_every_models_scalars(sweep):
    files = list((sweep / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars: dict[str, dict[int, float]] = {}
    for event in read_events(files[0]):
        for v in event.summary.value:
            scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    rows = [json.loads(line) for line in (sweep / "metrics.jsonl").read_text().splitlines()]
    for i, (seed, lr) in enumerate((s, lr) for s in SEEDS for lr in LRS):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            tag = f"seed{seed}_lr{lr:g}/{key}"
            assert tag in scalars, sorted(scalars)
            assert scalars[tag] == {r["epoch"]: pytest.approx(r[key][i], rel=1e-6) for r in rows}


def test_report_writes_figures_and_markdown(sweep, mnist_dir, capsys):
    from PIL import Image

    assert main(["report", str(sweep), "--data-dir", str(mnist_dir)]) == 0
    assert "report written to" in capsys.readouterr().out
    out = sweep / "report"
    for name in ("learning_curves.png", "confusion_matrix.png", "errors.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 300, name
            pixels = np.asarray(im.convert("L"))
            assert pixels.std() > 10, f"{name} looks blank"
    md = (out / "report.md").read_text()
    for name in ("learning_curves.png", "confusion_matrix.png", "errors.png"):
        assert name in md
    assert "4 models" in md or "4 model" in md, md[:800]
    results = json.loads((sweep / "results.json").read_text())
    assert f"| {results['ensemble_test_accuracy']:.2%} |" in md.split("### Per model")[0]
    assert f"| {results['test_accuracy_min']:.2%} |" in md.split("### Per model")[0]

    custom = sweep.parent / "elsewhere"
    assert main(["report", str(sweep), "--data-dir", str(mnist_dir), "--out", str(custom)]) == 0
    assert (custom / "report.md").is_file()


TINY = """
import flax.linen as nn


class Tiny(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.hidden)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))
"""


def test_report_of_a_user_model_run_rebuilds_it_from_the_config(mnist_dir, tmp_path, capsys):
    """A run of a user's module (file.py:Class, BatchNorm) with two seeds: the report
    rebuilds the module from config.json and shows the run's ensemble accuracy."""
    (tmp_path / "tiny.py").write_text(TINY)
    run = tmp_path / "run"
    assert main(["train", "--model", f"{tmp_path / 'tiny.py'}:Tiny", "--model-args",
                 '{"hidden": 16}', "--seeds", "0,1", "--epochs", "1", "--quiet",
                 "--data-dir", str(mnist_dir), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--data-dir", str(mnist_dir)]) == 0
    assert "report written to" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    summary = (run / "report" / "report.md").read_text().split("### Per model")[0]
    assert "tiny.py:Tiny" in summary.splitlines()[0]
    assert f"| {results['ensemble_test_accuracy']:.2%} |" in summary
    assert results["ensemble_test_accuracy"] > 0.85


def test_report_of_a_missing_run_is_a_one_line_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no run folder" in err
