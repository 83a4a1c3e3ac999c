"""benchmarks/nnx_speed.py: an NNX model and its linen twin compute the same function from
the same parameters, and the benchmark writes its results as other benchmarks do.

Nothing here looks at how fast anything ran: the timing run is tiny, only its structure
is checked."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness is not in the package
import nnx_speed  # noqa: E402


def test_a_tiny_run_writes_every_contender_and_its_ratios(tmp_path):
    assert nnx_speed.main(["--nets", "mlp", "--batch-sizes", "8", "--steps", "3",
                           "--rounds", "2", "--out", str(tmp_path),
                           "--machine-note", "shared with the test suite"]) == 0
    results = json.loads(next(tmp_path.glob("nnx-speed-*.json")).read_text())
    assert results["settings"] == {"steps": 3, "rounds": 2, "nets": ["mlp"],
                                   "batch_sizes": [8], "optimizer": "optax.adamw(0.005, 0.9)"}
    assert results["cpu"] and results["machine_note"] == "shared with the test suite"
    assert results["same_function"]["mlp"]["same"] is True
    (row,) = results["rows"]
    assert (row["net"], row["batch_size"]) == ("mlp", 8)
    assert set(row["step_seconds"]) == set(nnx_speed.CONTENDERS)
    for name, times in row["step_seconds"].items():
        assert len(times) == 2 and all(t > 0 for t in times), name
        assert row["median_step_seconds"][name] == statistics.median(times)
    ratio = row["nnx_over_linen"]
    assert ratio["of_medians"] == pytest.approx(
        statistics.median(row["step_seconds"]["nnx"]) /
        statistics.median(row["step_seconds"]["linen"]))
    assert ratio["per_round"] == pytest.approx(
        [a / b for a, b in zip(row["step_seconds"]["nnx"], row["step_seconds"]["linen"])])
    assert ratio["cpu_of_medians"] == pytest.approx(
        statistics.median(row["cpu_seconds_per_step"]["nnx"]) /
        statistics.median(row["cpu_seconds_per_step"]["linen"]))
    assert row["targets"]["nnx_over_linen"] == (ratio["of_medians"] <= 1.05)
    # both mnist-jax programs were compiled and analysed; they do the same arithmetic
    nnx_cost, linen_cost = row["programs"]["nnx"], row["programs"]["linen"]
    assert nnx_cost["flops"] == pytest.approx(linen_cost["flops"], rel=1e-3)
    md = next(tmp_path.glob("nnx-speed-*.md")).read_text()
    assert "| mlp | 623,290 |" in md and "| mlp | 8 |" in md
    assert "shared with the test suite" in md


def test_the_tutorial_cnn_and_its_linen_twin_are_the_same_function():
    """Inference, and training with dropout 0 (logits, loss, BatchNorm statistics,
    gradients), from the linen twin's parameters copied into the NNX trees."""
    check = nnx_speed.same_function("cnn", batch_size=8)
    assert check["same"] is True, check
    assert check["params"] == 824_650 and check["batch_stats"] == 2 * (32 + 64)
    for what, diff in check["max_abs_diff"].items():
        assert diff <= nnx_speed.ATOL, what


def test_the_check_sees_a_parameter_that_differs():
    nnx_state, linen_state = nnx_speed.twin_states("mlp", 8)
    bias = nnx_state.params["linear2"]["bias"]
    moved = nnx_state.replace(params={**nnx_state.params, "linear2": {
        **nnx_state.params["linear2"], "bias": bias.at[3].add(1e-3)}})
    check = nnx_speed.same_function("mlp", batch_size=8, states=(moved, linen_state))
    assert check["same"] is False
    assert check["max_abs_diff"]["inference_logits"] == pytest.approx(1e-3, rel=1e-2)


def test_copying_refuses_trees_of_other_layers_or_shapes():
    f32 = np.float32
    like = {"linear1": {"kernel": np.zeros((784, 784), f32), "bias": np.zeros(784, f32)}}
    with pytest.raises(ValueError, match="/linear1/kernel: linen shape"):
        nnx_speed.copy_tree({"linear1": {"kernel": np.zeros((784, 10), f32),
                                         "bias": np.zeros(784, f32)}}, like)
    with pytest.raises(ValueError, match="the linen tree has"):
        nnx_speed.copy_tree({"Dense_0": like["linear1"]}, like)
    copied = nnx_speed.copy_tree({"linear1": {"kernel": np.ones((784, 784), f32),
                                              "bias": np.ones(784, f32)}}, like)
    assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(copied))


@pytest.mark.parametrize("argv, message", [
    (["--nets", "resnet"], "unknown net(s) ['resnet']"),
    (["--batch-sizes", "32,x"], "expected comma-separated integers"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive integers"),
    (["--steps", "0"], "--steps and --rounds must be at least 1")])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        nnx_speed.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
