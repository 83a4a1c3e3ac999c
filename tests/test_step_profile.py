"""benchmarks/step_profile.py: where a training step's time goes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness is not in the package
import step_profile  # noqa: E402


def _event(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def _thread(tid: int, name: str) -> dict:
    return {"ph": "M", "name": "thread_name", "pid": 7, "tid": tid, "args": {"name": name}}


def test_a_kernel_counts_its_own_time_not_the_kernels_it_ran_inline():
    """A matmul that runs a select inline while it waits: 70 us matmul, 30 us select;
    the loop and executor spans around them, completion markers and the Python
    thread's frames count nothing; times are per step, in ms."""
    trace = {"traceEvents": [
        _thread(1, "tf_XLAEigen/1"), _thread(2, "python"), _thread(3, "tf_XLAEigen/2"),
        _event("while.3", 0, 500), _event("ThunkExecutor::Execute", 0, 400),
        _event("ynn_fusion.1", 10, 100), _event("select_bitcast_fusion", 20, 30),
        _event("end: select_bitcast_fusion", 50, 0.2),
        _event("bitcast_dynamic-update-slice_fusion", 200, 40),
        _event("stack.12", 0, 60, tid=3), _event("add_fusion", 70, 10, tid=3),
        _event("$api.py:1 block_until_ready", 0, 1000, tid=2),
        _event("ynn_fusion.9", 0, 900, tid=2),
    ]}
    s = step_profile.summarize_trace(trace, steps=2)
    assert s["kinds_ms"] == pytest.approx({
        "matmul (library)": 0.035, "ReLU / pool selects": 0.015,
        "scan buffers (dynamic slices, updates)": 0.02,
        "im2col copies (slices, stacks, pads)": 0.03,
        "other (elementwise, reductions, optimizer)": 0.005})
    assert s["thread_busy_ms"] == pytest.approx({"tf_XLAEigen/1 (1)": 0.07,
                                                 "tf_XLAEigen/2 (3)": 0.035})
    assert next(iter(s["top_ops_ms"])) == "ynn_fusion.1"


@pytest.mark.parametrize("op, kind", [
    ("ynn_fusion.6", "matmul (library)"), ("dot_general.38", "matmul (library)"),
    ("select_dynamic-update-slice_fusion.2", "scan buffers (dynamic slices, updates)"),
    ("slice_bitcast_fusion.17", "im2col copies (slices, stacks, pads)"),
    ("broadcast_select_fusion.1", "ReLU / pool selects"),
    ("multiply_add_fusion.16", step_profile.OTHER)])
def test_ops_are_classified_by_their_xla_names(op, kind):
    assert step_profile.kind_of(op) == kind


def test_a_real_profile_of_the_speedrun_step(tmp_path):
    """One step of the speedrun's compiled program under JAX's profiler (the installed
    JAX's trace format): matmuls and im2col copies found, the cores' utilisation a
    fraction, the floor below the step, and both results files written."""
    assert step_profile.main(["speedrun", "--steps", "1", "--rounds", "1",
                              "--out", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("step-profile-*.json")).read_text())
    (r,) = results["recipes"]
    assert r["recipe"] == "speedrun" and r["batch_size"] == 256
    assert r["kinds_ms"]["matmul (library)"] > 0
    assert r["kinds_ms"]["im2col copies (slices, stacks, pads)"] > 0
    assert r["thread_busy_ms"] and all(v > 0 for v in r["thread_busy_ms"].values())
    assert 0 < r["derived"]["cpu_utilisation"] <= 1.5
    assert 0 < r["derived"]["floor_step_seconds"] < r["step_seconds"]
    md = next(tmp_path.glob("step-profile-*.md")).read_text()
    assert "## `speedrun` (smallcnn, batch 256)" in md and "| matmul (library) |" in md


@pytest.mark.parametrize("argv, message", [
    (["fastest"], "unknown recipe(s) ['fastest']"),
    (["speedrun", "--steps", "0"], "--steps and --rounds must be at least 1")])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        step_profile.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
