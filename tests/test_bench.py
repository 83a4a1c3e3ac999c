"""The benchmark's pure parts (benchmarks/bench.py and the bench_*.py modules it is split
into): FLOP counts, ratios, targets, tables, missing peers, and the ``mnist-jax bench``
entry that runs it.

Nothing here times anything or asserts on time.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax.dropout import hash_keep_mask
from mnist_jax.summary import count_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness is not in the package
import bench  # noqa: E402
import bench_harness  # noqa: E402
import bench_peers  # noqa: E402
import bench_results  # noqa: E402
import bench_speedrun  # noqa: E402


def test_training_flops_of_the_tutorial_mlp():
    f = bench_harness.training_flops("mlp")
    assert f["forward"] == 2 * (784 * 784 + 784 * 10)
    # first layer: forward + weight gradient; second: + input gradient
    assert f["train"] == 4 * 784 * 784 + 6 * 784 * 10
    cnn = bench_harness.training_flops("cnn")
    assert cnn["train"] > 2 * cnn["forward"] > 0


def test_the_eval_floor_is_the_time_that_runs_at_the_ceiling():
    """Evaluating in exactly the floor time achieves exactly the ceiling's GFLOP/s;
    twice the images take twice as long, a device twice as fast half as long."""
    forward, images, ceiling = bench_harness.training_flops("cnn")["forward"], 10_000, 400.0
    floor = bench_results.eval_floor_seconds(forward, images, ceiling)
    assert math.isclose(bench_harness.achieved_gflops(forward, images / floor), ceiling)
    assert math.isclose(bench_results.eval_floor_seconds(forward, 2 * images, ceiling), 2 * floor)
    assert math.isclose(bench_results.eval_floor_seconds(forward, images, 2 * ceiling), floor / 2)
    assert bench_results.eval_floor_seconds(forward, images, None) is None  # no ceiling measured


def test_device_slug_and_amx_report():
    assert bench_harness.device_slug("cpu", "AMD EPYC", 1, cores=2, flags={"avx2", "avx512f"}) == (
        "cpu-AMD-EPYC-2core")
    # the same model name without AVX-512 (another CPU generation) gets results of its own
    assert bench_harness.device_slug("cpu", "AMD EPYC", 1, cores=2, flags={"avx2"}) == (
        "cpu-AMD-EPYC-noavx512-2core")
    assert bench_harness.device_slug("gpu", "NVIDIA H100 80GB HBM3", 8) == "gpu-NVIDIA-H100-80GB-HBM3-x8"
    assert "no AMX" in bench_harness.amx_report({"avx512f", "avx512_bf16"})["note"]
    assert bench_harness.amx_report({"amx_tile", "amx_bf16"})["amx_flags"] == ["amx_bf16", "amx_tile"]


def test_missing_peer_is_reported_as_missing(monkeypatch):
    monkeypatch.setitem(bench_peers.PEER_MODULES, "torch", "no_such_module_mnist_jax_test")
    assert not bench_peers.peer_available("torch")
    r = bench_peers.run_peer("torch", "mlp", epochs=2, steps=3, data_dir=None, synthetic=True, timeout=5)
    assert r["status"] == "missing" and "not installed" in r["reason"]


def test_a_child_process_runs_this_checkouts_code_and_reports_back(monkeypatch):
    """Peers and cold-start runs are children running benchmarks/bench.py itself: they
    find this checkout's package without help from $PYTHONPATH."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    r = bench_harness.run_child({"kind": "no-such-kind", "synthetic": True}, timeout=120)
    assert r["status"] == "error" and "unknown child task 'no-such-kind'" in r["error"], r


def _fake_results(tmp_quick=True) -> dict:
    ours = {"status": "ok", "compile_seconds": 1.0, "epoch_seconds": [1.0, 0.5, 0.5],
            "epoch_seconds_median": 0.5, "images_per_epoch": 59904, "images_per_second": 119808.0,
            "gflops": 300.0, "eval_seconds": 0.05, "eval_images": 10000, "measured": "2 epochs"}
    keras = {"status": "ok", "epoch_seconds_median": 1.0, "images_per_epoch": 60000,
             "images_per_second": 60000.0, "eval_seconds": 0.1, "measured": "3 epochs"}
    entry = {"flops_per_image": bench_harness.training_flops("mlp"), "ours": ours, "keras": keras,
             "torch": bench_harness.missing("torch is not installed")}
    entry["ratios"] = bench_results.compute_ratios(entry, 400.0)
    results = {"device": "cpu-Test-CPU-2core", "quick": tmp_quick, "date": "today",
               "device_info": {"jax": jax.__version__, "cores": 2,
                               "amx": bench_harness.amx_report(set())},
               "ceiling": {"fp32_gflops": 400.0, "bf16_gflops": 200.0},
               "models": {"mlp": entry}, "method": ["FLOPs counted from shapes."]}
    results["targets"] = bench_results.target_checks(results)
    return results


def test_ratios_and_targets():
    r = _fake_results()
    ratios = r["models"]["mlp"]["ratios"]
    np.testing.assert_allclose(ratios["ours_over_keras"], (0.5 / 59904) / (1.0 / 60000))
    assert ratios["ours_over_torch"] is None
    assert ratios["achieved_over_ceiling"] == 0.75
    t = r["targets"]
    assert t["mlp_epoch_over_keras"]["met"] is True
    assert t["mlp_achieved_over_ceiling"]["met"] is True
    assert t["cnn_epoch_over_keras"]["met"] is None  # not measured
    assert t["mlp_eval_seconds"]["met"] is True


def test_time_to_accuracy_target_takes_the_fastest_recipe_that_reached_it():
    r = _fake_results()
    assert r["targets"]["cnn_time_to_99_seconds"]["met"] is None  # nothing ran
    r["time_to_accuracy"] = {"status": "ok", "model": "cnn", "target": 0.99, "reached": True,
                             "seconds": 118.0, "epochs": 5, "accuracy": [0.98, 0.99]}
    r["time_to_accuracy_recipes"] = [
        {"status": "ok", "model": "cnn", "target": 0.99, "reached": True, "seconds": 45.0,
         "epochs": 2, "accuracy": [0.985, 0.991], "recipe": {"batch_size": 256}},
        {"status": "ok", "model": "cnn", "target": 0.99, "reached": False, "seconds": 20.0,
         "epochs": 1, "accuracy": [0.985]},  # fast, but never got there: does not count
        {"status": "timeout", "model": "convnet", "target": 0.99, "reason": "no result"}]
    t = bench_results.target_checks(r)
    assert t["cnn_time_to_99_seconds"] == {"value": 45.0, "target": 30.0, "at_most": True,
                                           "met": False}
    notes = "\n".join(bench_results._notes(r))
    assert "after 2 epochs, 45.0 s" in notes and "batch_size 256" in notes
    assert "NOT reached after 1 epochs" in notes and "(convnet, default recipe): timeout" in notes


def test_a_gpu_is_held_to_the_gpu_targets():
    r = _fake_results()
    r["device_info"]["platform"] = "gpu"
    r["models"]["mlp"]["ours"].update(epoch_seconds=[0.02] * 100, train_seconds=2.0)
    r["time_to_accuracy"] = {"status": "ok", "reached": True, "train_seconds": 2.5}
    t = bench_results.target_checks(r)
    assert "mlp_epoch_over_keras" not in t  # the ratio targets are the 2-core CPU's
    assert t["mlp_100_epochs_train_seconds"]["met"] is True
    assert t["cnn_tta_train_seconds"] == {"value": 2.5, "target": 2.0, "at_most": True, "met": False}
    assert t["cnn_eval_seconds"]["met"] is None  # no CNN in these results
    r["models"]["mlp"]["ours"]["epoch_seconds"] = [0.02] * 12  # not the tutorial's 100 epochs
    assert bench_results.target_checks(r)["mlp_100_epochs_train_seconds"]["met"] is None


def test_table_and_result_files(tmp_path):
    r = _fake_results()
    text = bench_results.format_table(r)
    assert "mnist-jax" in text and "Keras 3" in text and "missing" in text
    assert "0.50x" in text and "75%" in text
    json_path, md_path = bench_results.write_results(r, tmp_path)
    assert json_path.name == "cpu-Test-CPU-2core-quick.json"
    assert json.loads(json_path.read_text())["models"]["mlp"]["torch"]["status"] == "missing"
    md = md_path.read_text()
    assert md.startswith("# MNIST training benchmark") and "| mlp | mnist-jax |" in md
    assert "no AMX" in md
    full = dict(r, quick=False)
    assert bench_results.write_results(full, tmp_path)[0].name == "cpu-Test-CPU-2core.json"


def test_parse_lists_and_plan():
    from mnist_jax.errors import UsageError
    assert bench._parse_list("keras, torch", bench_peers.PEERS, "--peers") == ["keras", "torch"]
    assert bench._parse_list("none", bench_peers.PEERS, "--peers") == []
    with pytest.raises(UsageError, match="--peers"):
        bench._parse_list("tensorflow", bench_peers.PEERS, "--peers")
    assert bench.plan(True)["train_images"]["mlp"] < 60000
    for quick, accelerator in ((True, False), (False, False), (False, True)):
        p = bench.plan(quick, accelerator)
        for key in ("train_images", "epochs", "peer_epochs", "peer_steps", "bf16_steps",
                    "bf16_train_images"):
            assert set(p[key]) == set(bench_harness.MODELS), (quick, accelerator, key)
    assert bench_harness.measured_epochs([3.0, 1.0, 2.0]) == [1.0, 2.0]
    assert bench_harness.measured_epochs([3.0]) == [3.0]


def test_cli_bench_passes_its_arguments_to_the_harness():
    from mnist_jax.cli import build_parser
    argv = ["--quick", "--peers", "none", "--models", "mlp"]
    args = build_parser().parse_args(["bench", *argv])
    assert args.func.__name__ == "cmd_bench" and args.bench_args == argv
    parsed = bench.build_parser().parse_args(args.bench_args)
    assert parsed.quick and parsed.peers == "none" and parsed.models == "mlp"


def test_the_cli_imports_the_harness_only_when_bench_runs():
    code = ("import sys; from mnist_jax.cli import build_parser; build_parser(); "
            "print('bench' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_cli_bench_without_a_source_checkout_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from mnist_jax import cli
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "benchmarks")  # a wheel
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0], err


def test_cli_bench_bad_flags_are_one_line_exit_2(capsys):
    from mnist_jax.cli import main
    with pytest.raises(SystemExit) as e:
        main(["bench", "--models", "mlp", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mnist-jax bench" in err[0] and "--no-such-flag" in err[0], err
    assert main(["bench", "--peers", "tensorflow"]) == 2
    assert "--peers" in capsys.readouterr().err


def test_hashed_dropout_mask_keeps_the_right_fraction_and_is_deterministic():
    key = jax.random.PRNGKey(3)
    m = np.asarray(hash_keep_mask(key, 0.6, (256, 784)))
    assert abs(m.mean() - 0.6) < 0.01
    assert np.array_equal(m, np.asarray(hash_keep_mask(key, 0.6, (256, 784))))
    assert not np.array_equal(m, np.asarray(hash_keep_mask(jax.random.fold_in(key, 1), 0.6,
                                                           (256, 784))))


INSTALL = {"keras": "pip install -e '.[bench]'",
           "torch": "in no extra: pip install torch==2.13.0 takes the CPU build"}


@pytest.mark.parametrize("peer", ["keras", "torch"])
def test_the_peers_train_our_models(peer, monkeypatch):
    """Each peer's twin of mlp / cnn / convnet has exactly our parameter count."""
    if not bench_peers.peer_available(peer):
        pytest.skip(f"{peer} is not installed ({INSTALL[peer]})")
    from mnist_jax.models import create_model
    if peer == "keras":
        monkeypatch.setenv("KERAS_BACKEND", "jax")
        count = lambda m: m.count_params()  # noqa: E731
        build = bench_peers.keras_model
    else:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        build = bench_peers.torch_model
    for name in bench_harness.MODELS:
        ours = create_model(name)
        params = ours.init(jax.random.key(0), np.zeros((1, 28, 28), np.float32), train=False)
        assert count(build(name)) == count_params(params["params"]), name


# ---- the speedrun peer (--speedrun) ------------------------------------------------------

def _ours_results(accs, epoch_seconds=(8.0,), status="completed"):
    return {"status": status, "test_accuracy": accs, "epoch_seconds": list(epoch_seconds),
            "compile_seconds": 3.0, "data_seconds": 0.2, "total_seconds": 13.0}


def test_seeds_flag_lists_seeds_from_zero():
    assert bench_speedrun.seeds_flag(1) == "0"
    assert bench_speedrun.seeds_flag(16).split(",") == [str(i) for i in range(16)]
    with pytest.raises(ValueError):
        bench_speedrun.seeds_flag(0)


def test_result_line_is_the_last_prefixed_json_line():
    out = "\n".join(["noise", bench_harness.RESULT_PREFIX + '{"a": 1}', "more",
                     bench_harness.RESULT_PREFIX + '{"a": 2, "status": "ok"}'])
    assert bench_harness.result_from_stdout(out) == {"a": 2, "status": "ok"}
    assert bench_harness.result_from_stdout("no result here\n") is None


def test_ours_from_results_one_seed_and_many():
    one = bench_speedrun.ours_from_results(_ours_results(0.9905), process_seconds=15.0)
    assert one["status"] == "ok" and one["seeds"] == 1
    assert one["test_accuracy"] == 0.9905 == one["test_accuracy_mean"] == one["test_accuracy_min"]
    assert (one["train_seconds"], one["compile_seconds"], one["process_seconds"]) == (8.0, 3.0, 15.0)
    many = bench_speedrun.ours_from_results(_ours_results([0.99, 0.992, 0.988, 0.994],
                                                 epoch_seconds=(30.0,)), 40.0)
    assert many["seeds"] == 4 and many["test_accuracy"] == [0.99, 0.992, 0.988, 0.994]
    assert many["test_accuracy_mean"] == pytest.approx(0.991)
    assert many["test_accuracy_min"] == 0.988
    failed = bench_speedrun.ours_from_results(_ours_results(0.5, status="failed"), 3.0)
    assert failed["status"] == "error" and "failed" in failed["error"]


def test_speedrun_summary_takes_medians_of_the_good_runs_and_checks_both_ratios():
    torch_runs = [{"status": "ok", "train_seconds": t, "process_seconds": p, "test_accuracy": a}
                  for t, p, a in ((6.0, 10.0, 0.990), (5.0, 9.0, 0.991), (7.0, 11.0, 0.992))]
    torch_runs.append({"status": "timeout", "reason": "too slow"})
    ours_runs = [dict(bench_speedrun.ours_from_results(_ours_results(0.9905, (t,)), p))
                 for t, p in ((2.0, 6.0), (3.0, 8.0), (2.5, 7.0))]
    s = bench_speedrun.speedrun_summary(torch_runs, ours_runs)
    assert s["torch"]["runs"] == 4 and s["torch"]["ok"] == 3
    assert s["torch"]["train_seconds"] == 6.0 and s["ours"]["train_seconds"] == 2.5
    assert s["ours"]["compile_seconds"] == 3.0
    assert s["ratios"]["train_seconds"] == pytest.approx(2.5 / 6.0)
    assert s["ratios"]["process_seconds"] == pytest.approx(7.0 / 10.0)
    assert s["targets"]["train_seconds"]["met"] is True        # 0.417 <= 0.5
    assert s["targets"]["process_seconds"]["met"] is True      # 0.7 <= 0.75
    slow = bench_speedrun.speedrun_summary(torch_runs, [dict(ours_runs[0], process_seconds=9.0)])
    assert slow["targets"]["process_seconds"]["met"] is False  # 0.9 > 0.75
    none = bench_speedrun.speedrun_summary([bench_harness.missing("torch is not installed")], ours_runs)
    assert none["ratios"]["train_seconds"] is None
    assert none["targets"]["train_seconds"]["met"] is None
    assert "ours_warm" not in s and "ratios_warm" not in s
    warm = bench_speedrun.speedrun_summary(torch_runs, ours_runs,
                                  [dict(r, process_seconds=r["process_seconds"] - 2.5)
                                   for r in ours_runs])
    assert warm["ratios"] == s["ratios"]  # the compiling side is judged as before
    assert warm["ratios_warm"]["process_seconds"] == pytest.approx(4.5 / 10.0)
    assert warm["targets_warm"]["process_seconds"]["met"] is True
    # PyTorch in channels_last: a second peer, ours judged against both
    fast_torch = [dict(r, train_seconds=r["train_seconds"] / 2) for r in torch_runs[:3]]
    both = bench_speedrun.speedrun_summary(torch_runs, ours_runs, ours_runs, fast_torch)
    assert both["ratios"] == s["ratios"] and both["torch_cl"]["train_seconds"] == 3.0
    assert "compile_seconds" not in both["torch_cl"]
    assert both["ratios_cl"]["train_seconds"] == pytest.approx(2.5 / 3.0)
    assert both["targets_warm_cl"]["train_seconds"]["met"] is False  # 0.83 > 0.5
    assert "torch_cl" not in s and "ratios_cl" not in s


def test_speedrun_markdown_shows_both_sides_ratios_and_the_seeds():
    torch_runs = [{"status": "ok", "train_seconds": 6.0, "process_seconds": 10.0,
                   "test_accuracy": 0.9912, "load_before": 1.5}]
    ours_runs = [bench_speedrun.ours_from_results(_ours_results(0.9905, (2.0,)), 6.5)]
    seeds = bench_speedrun.ours_from_results(_ours_results([0.991, 0.989], (4.0,)), 12.0)
    results = {"device": "cpu-test", "date": "today", "rounds": 1, "torch_version": "2.x",
               "runs": {"torch": torch_runs, "ours": ours_runs}, "seeds_run": seeds,
               "summary": bench_speedrun.speedrun_summary(torch_runs, ours_runs), "notes": ["a note"]}
    md = bench_speedrun.format_speedrun_markdown(results)
    assert "| PyTorch 2.x (the record's script) | 6.00 | 10.00 | - | 0.9912 |" in md
    threads = bench_speedrun.format_speedrun_markdown(dict(results, torch_threads=1))
    assert "| PyTorch 2.x (the record's script, 1 threads) |" in threads
    assert "| mnist-jax `train --recipe speedrun` | 2.00 | 6.50 | 3.00 | 0.9905 |" in md
    assert "| train seconds | 0.333 | <= 0.5 | yes |" in md
    assert "| process seconds | 0.650 | <= 0.75 | yes |" in md
    assert "--seeds 0,1" in md and "mean test accuracy 0.9900" in md
    assert "(target >= 0.99: met)" in md and "minimum 0.9890" in md
    assert "Per seed: 0.9910, 0.9890." in md and "- a note" in md
    warm_runs = [dict(ours_runs[0], process_seconds=4.0, compile_seconds=0.5)]
    warm = bench_speedrun.format_speedrun_markdown(dict(
        results, runs={"torch": torch_runs, "ours": ours_runs, "ours_warm": warm_runs},
        summary=bench_speedrun.speedrun_summary(torch_runs, ours_runs, warm_runs)))
    assert ("| mnist-jax `train --recipe speedrun`, XLA's compilation cache warm | 2.00 | 4.00 "
            "| 0.50 | 0.9905 |") in warm
    assert "| process seconds, XLA cache warm | 0.400 | <= 0.75 | yes |" in warm
    assert "- ours_warm: 2.00 / 4.00; 0.9905" in warm
    cl_runs = [dict(torch_runs[0], train_seconds=3.0)]
    cl = bench_speedrun.format_speedrun_markdown(dict(
        results, runs={"torch": torch_runs, "torch_cl": cl_runs, "ours": ours_runs},
        summary=bench_speedrun.speedrun_summary(torch_runs, ours_runs, channels_last_runs=cl_runs)))
    assert "| PyTorch 2.x (the record's script, channels_last) | 3.00 | 10.00 | - |" in cl
    assert "| train seconds vs channels_last | 0.667 | <= 0.5 | NO |" in cl
    assert "- torch_cl: 3.00 / 10.00; 0.9912" in cl
    missing = dict(results, runs={"torch": [bench_harness.missing("torch is not installed")],
                                  "ours": ours_runs},
                   summary=bench_speedrun.speedrun_summary([bench_harness.missing("x")], ours_runs))
    md = bench_speedrun.format_speedrun_markdown(missing)
    assert "not measured" in md and "torch: missing (torch is not installed)" in md


def test_speedrun_flags_parse_and_bad_counts_are_usage_errors():
    args = bench.build_parser().parse_args(["--speedrun", "--rounds", "2",
                                            "--speedrun-seeds", "0", "--torch-threads", "1"])
    assert args.speedrun and args.rounds == 2 and args.speedrun_seeds == 0
    assert args.torch_threads == 1
    assert not bench.build_parser().parse_args([]).speedrun
    from mnist_jax.errors import UsageError
    with pytest.raises(UsageError):
        bench_speedrun.run_speedrun(bench.build_parser().parse_args(["--speedrun", "--rounds", "0"]))


def test_the_torch_speedrun_script_is_the_records_recipe_and_imports_no_jax():
    """The peer script compiles, and names the record's settings (not run here: no torch
    in CI); it never imports JAX or this project, so its process time is PyTorch's."""
    script = bench_speedrun.TORCH_SPEEDRUN_SCRIPT
    compile(script, "torch_speedrun", "exec")
    for piece in ("nn.Conv2d(1, 24, 5)", "nn.Conv2d(24, 32, 3)", "nn.Linear(800, 256)",
                  "nn.Linear(256, 10)", "lr=1e-2, betas=(0.7, 0.9)", "OneCycleLR",
                  "cycle_momentum=False", "MEAN, STD, BATCH = 0.1307, 0.3081, 256"):
        assert piece in script, piece
    assert "import jax" not in script and "mnist_jax" not in script


def test_the_torch_speedrun_script_trains_and_reports(tmp_path):
    """Where PyTorch is installed: the script trains on 512 synthetic images (2 steps),
    evaluates and prints one result line, with JAX never imported."""
    pytest.importorskip("torch", reason=f"torch is not installed ({INSTALL['torch']})")
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, train_images=rng.integers(0, 256, (512, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 10, 512).astype(np.uint8),
             test_images=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 10, 100).astype(np.uint8))
    for channels_last in (False, True):
        arg = json.dumps({"data": str(data), "seed": 0, "prefix": bench_harness.RESULT_PREFIX,
                          "channels_last": channels_last})
        proc = subprocess.run([sys.executable, "-c", bench_speedrun.TORCH_SPEEDRUN_SCRIPT, arg],
                              capture_output=True, text=True, timeout=300)
        r = bench_harness.result_from_stdout(proc.stdout)
        assert r is not None, proc.stderr[-500:]
        assert r["status"] == "ok" and r["steps"] == 2 and r["imported_jax"] is False
        assert r["channels_last"] is channels_last
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_seconds"] > 0
