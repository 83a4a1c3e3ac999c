"""``mnist-jax bench``: how fast this project trains MNIST, next to Keras 3 and PyTorch
and next to what the hardware can do -- all measured in one run on one machine.

    python benchmarks/bench.py [--quick] [--models mlp,cnn] [--peers none] ...
    mnist-jax bench ...        # the same, from a source checkout

For the tutorial MLP (784-784-10, dropout 0.4), the default CNN and keras.io's small
"Simple MNIST convnet" (``convnet``), all with Adam (lr 1e-3, eps 1e-7), batch 128,
float32 and the real MNIST data (uint8 -> /255):

* **this project**: compile seconds, seconds per epoch (median over several epochs
  after a warm-up epoch), images/s, achieved GFLOP/s and its fraction of the
  matmul ceiling, evaluation time of the 10,000 test images;
* **Keras 3 (JAX backend, ``model.fit``)** and **PyTorch eager** -- each in its own
  subprocess (Keras' backend is fixed at import, and neither shares jit caches
  or thread pools with us).  A peer that is not installed is reported as
  "missing", not as a failure.  The CNN peers take ~1-2 min per epoch on a small
  CPU, so they time a fixed number of steps per epoch and scale to a full epoch
  (the results say so);
* **the hardware ceiling**: a large square ``jnp`` matmul under ``jit``, fp32 and bf16;
* **time to 99 % test accuracy** for the CNN from a cold process (interpreter
  start, data loading and compilation included);
* **bf16 vs fp32** step time and the accuracy of a short bf16 run, plus whether
  the CPU has AMX (bf16 matrix units) at all.

FLOPs are counted from the layer shapes (:func:`mnist_jax.summary.flops_per_example`):
2 x multiply-adds of every Dense/Conv layer, forward + weight gradient + input
gradient (no input gradient for the first layer); biases, activations, pooling,
dropout, loss and Adam are not counted (< 1 %).  Achieved GFLOP/s = training
FLOPs per image x images per second.

Results: a table on stdout, ``<out>/<device>.json`` and ``<out>/<device>.md``
(``<device>-quick.*`` for ``--quick``).  Nothing here asserts on time.

This harness is not part of the installed package: it lives in the repository's
``benchmarks/`` folder, and its subprocesses run this same file (``--child``).  This file
is the entry point and the measurements of mnist-jax itself; the rest is split by job:
``bench_harness.py`` (settings, device names, timing, data, child processes, results files,
shared with the other scripts here), ``bench_peers.py`` (the Keras and PyTorch twins),
``bench_results.py`` (ratios, targets, tables) and ``bench_speedrun.py`` (``--speedrun``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # a script (so is every child, see run_child): this checkout's code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_harness import (  # noqa: E402  (the benchmarks/ folder: the script's own)
    ADAM_EPS, BATCH_SIZE, LEARNING_RATE, MODELS, RESULT_PREFIX, achieved_gflops, amx_report,
    cpu_flags, cpu_model, device_slug, load_data, log, matmul_ceiling, measured_epochs, median,
    missing, parse_timing_args, run_child, script_header, subset, timed, training_flops,
    write_result_files)
from bench_peers import PEERS, child_keras, child_torch, run_peer  # noqa: E402
from bench_results import (compute_ratios, eval_floor_seconds, format_table,  # noqa: E402
                           target_checks, write_results)
from bench_speedrun import run_speedrun  # noqa: E402

# The other benchmark scripts import the harness's helpers from here as well.
__all__ = ["amx_report", "cpu_flags", "cpu_model", "device_slug", "main", "matmul_ceiling",
           "parse_timing_args", "script_header", "write_result_files"]


TTA_TARGET = 0.99
# Further cold-process runs to 99 %: the fastest recipes found for each CNN (one seed each;
# "epochs" is the length of the cosine schedule, the run stops at the first epoch >= 99 %).
TTA_RECIPES = [
    {"model": "cnn", "max_epochs": 4,
     "recipe": {"batch_size": 256, "learning_rates": [0.002], "lr_schedule": "cosine"}},
    {"model": "convnet", "max_epochs": 5,
     "recipe": {"learning_rates": [0.003], "lr_schedule": "cosine"}},
]


def plan(quick: bool, accelerator: bool = False) -> dict[str, Any]:
    """How much of everything to measure: full, or CI-sized with ``--quick``.

    On an accelerator every epoch is cheap: the MLP trains the tutorial's whole 100
    epochs (the GPU target), the CNN its 12, and the peers run whole epochs.
    """
    if quick:
        return {
            "train_images": {"mlp": 6400, "cnn": 1280, "convnet": 1280},  # 50 / 10 steps an epoch
            "epochs": {"mlp": 3, "cnn": 2, "convnet": 2},               # first one: warm-up
            "peer_epochs": {"mlp": 2, "cnn": 2, "convnet": 2},
            "peer_steps": {"mlp": 20, "cnn": 3, "convnet": 3},          # per "epoch", scaled up
            "bf16_steps": {"mlp": 20, "cnn": 3, "convnet": 3},
            "bf16_train_images": {"mlp": 6400, "cnn": 640, "convnet": 640},
            "ceiling_n": 1024, "reps": 3,
            "tta": {"model": "cnn", "max_epochs": 1, "train_images": 1280},
            "tta_recipes": [],
        }
    return {
        "train_images": {"mlp": None, "cnn": None, "convnet": None},  # all 60,000
        "epochs": {"mlp": 6, "cnn": 3, "convnet": 4},
        "peer_epochs": {"mlp": 4, "cnn": 3, "convnet": 3},
        "peer_steps": {"mlp": None, "cnn": 40, "convnet": 100},      # MLP peers: whole epochs
        "bf16_steps": {"mlp": 100, "cnn": 20, "convnet": 50},
        "bf16_train_images": {"mlp": None, "cnn": None, "convnet": None},
        "ceiling_n": 2048, "reps": 10,
        "tta": {"model": "cnn", "max_epochs": 10, "train_images": None},
        "tta_recipes": TTA_RECIPES,
    } if not accelerator else {
        "train_images": {"mlp": None, "cnn": None, "convnet": None},
        "epochs": {"mlp": 100, "cnn": 12, "convnet": 15},
        "peer_epochs": {"mlp": 5, "cnn": 4, "convnet": 4},
        "peer_steps": {"mlp": None, "cnn": None, "convnet": None},
        "bf16_steps": {"mlp": 400, "cnn": 200, "convnet": 200},
        "bf16_train_images": {"mlp": None, "cnn": None, "convnet": None},
        "ceiling_n": 8192, "reps": 20,
        "tta": {"model": "cnn", "max_epochs": 12, "train_images": None},
        "tta_recipes": TTA_RECIPES,
    }


def measure_ours(model_name: str, ds, epochs: int, reps: int) -> dict[str, Any]:
    """Train ``epochs`` epochs with :func:`mnist_jax.fit`; time epochs and evaluation."""
    import jax
    from mnist_jax.config import TrainConfig
    from mnist_jax.run import fit

    config = TrainConfig(model=model_name, epochs=epochs, batch_size=BATCH_SIZE,
                         learning_rates=(LEARNING_RATE,), adam_eps=ADAM_EPS, checkpoint_every=0)
    result = fit(config, ds)
    secs = measured_epochs(result.timings["epoch_seconds"])
    steps = len(ds.train_labels) // BATCH_SIZE
    images = steps * BATCH_SIZE
    epoch_s = median(secs)
    flops = training_flops(model_name)
    eval_fn = result.fns.evaluate.lower(result.state, *result.data.test).compile()
    eval_times = timed(eval_fn, result.state, *result.data.test, reps=reps)
    return {
        "status": "ok", "compile_seconds": result.timings["train_compile_seconds"],
        "eval_compile_seconds": result.timings["compile_seconds"] - result.timings["train_compile_seconds"],
        "epoch_seconds": result.timings["epoch_seconds"], "epoch_seconds_median": epoch_s,
        "steps_per_epoch": steps, "images_per_epoch": images,
        "images_per_second": images / epoch_s, "gflops": achieved_gflops(flops["train"], images / epoch_s),
        "eval_seconds": median(eval_times), "eval_images": int(result.data.test[0].shape[0]),
        "test_accuracy_per_epoch": [r["test_accuracy"] for r in result.history],
        "train_seconds": float(sum(result.timings["epoch_seconds"])),
        "impl": getattr(jax.devices()[0], "platform", "?"),
        "measured": f"{len(secs)} epochs after 1 warm-up, {images} images each",
    }


def measure_bf16(model_name: str, ds, steps: int, train_images: int | None, reps: int,
                 fp32_accuracy: float | None) -> dict[str, Any]:
    """fp32 vs bf16 time per step (same process, interleaved) and a 1-epoch bf16 run."""
    import jax
    import jax.numpy as jnp
    from mnist_jax.config import TrainConfig
    from mnist_jax.run import build_model, fit
    from mnist_jax.training import create_train_state, make_optimizer, run_steps

    x = jnp.asarray(ds.train_images[: steps * BATCH_SIZE]).reshape(steps, BATCH_SIZE, 28, 28)
    y = jnp.asarray(ds.train_labels[: steps * BATCH_SIZE].astype("int32")).reshape(steps, BATCH_SIZE)
    fns, states = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = TrainConfig(model=model_name, dtype=dtype)
        states[dtype] = create_train_state(build_model(config), make_optimizer(LEARNING_RATE, ADAM_EPS), 0)
        fns[dtype] = jax.jit(run_steps).lower(states[dtype], x, y).compile()
        jax.block_until_ready(fns[dtype](states[dtype], x, y))
    times: dict[str, list[float]] = {d: [] for d in fns}
    for _ in range(max(reps // 3, 2)):
        for d in fns:
            times[d] += timed(fns[d], states[d], x, y, reps=1)
    fp32_ms, bf16_ms = (median(times[d]) / steps * 1e3 for d in ("float32", "bfloat16"))
    sub = subset(ds, train_images)
    run = fit(TrainConfig(model=model_name, dtype="bfloat16", epochs=1, checkpoint_every=0), sub)
    return {"status": "ok", "step_ms_fp32": fp32_ms, "step_ms_bf16": bf16_ms,
            "bf16_over_fp32": bf16_ms / fp32_ms, "steps_timed": steps,
            "test_accuracy_bf16": run.test["accuracy"], "test_accuracy_fp32": fp32_accuracy,
            "epochs": 1, "train_images": len(sub.train_labels)}


def run_time_to_accuracy(model_name: str, target: float, max_epochs: int, train_images: int | None,
                         data_dir: str | None, synthetic: bool, timeout: float,
                         recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model_name`` in a cold process until its test accuracy reaches ``target``;
    ``recipe``: TrainConfig overrides (batch size, learning rates, schedule, ...)."""
    task = {"kind": "tta", "model": model_name, "target": target, "max_epochs": max_epochs,
            "train_images": train_images, "data_dir": data_dir, "synthetic": synthetic,
            "recipe": recipe or {}}
    r = run_child(task, timeout)
    if r.get("status") == "ok":
        # From the moment the cold process was started to the epoch reaching the target.
        r["seconds"] = r.pop("finished_at") - r["process_started"]
    r.setdefault("model", model_name)
    r.setdefault("target", target)
    return r


def _child_main(task: dict[str, Any]) -> dict[str, Any]:
    ds = load_data(task.get("data_dir"), task.get("synthetic", False))
    if task["kind"] == "tta":
        return _child_tta(task, ds)
    if task["kind"] == "keras":
        return child_keras(task, ds)
    if task["kind"] == "torch":
        return child_torch(task, ds)
    raise ValueError(f"unknown child task {task['kind']!r}")


def _child_tta(task: dict[str, Any], ds) -> dict[str, Any]:
    from mnist_jax.config import TrainConfig
    from mnist_jax.run import fit

    class Reached(Exception):
        pass

    accuracy: list[float] = []
    seconds: list[float] = []

    def on_epoch(epoch, state, row):
        accuracy.append(float(row["test_accuracy"]))
        seconds.append(float(row["epoch_seconds"]))
        if accuracy[-1] >= task["target"]:
            raise Reached

    # "recipe": TrainConfig overrides (batch size, lr, schedule, ...) for other recipes.
    config = TrainConfig(model=task["model"], epochs=task["max_epochs"], checkpoint_every=0,
                         **task.get("recipe", {})).validate()
    reached = True
    try:
        fit(config, subset(ds, task.get("train_images")), on_epoch=on_epoch)
        reached = False
    except Reached:
        pass
    return {"status": "ok", "model": task["model"], "target": task["target"], "reached": reached,
            "epochs": len(accuracy), "accuracy": accuracy, "finished_at": time.time(),
            "epoch_seconds": seconds, "train_seconds": sum(seconds),
            "recipe": {k: v for k, v in config.to_dict().items()
                       if k in ("batch_size", "learning_rates", "lr_schedule", "epochs")},
            "train_images": len(subset(ds, task.get("train_images")).train_labels)}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2), as the ``mnist-jax`` command has it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "bench.py") -> argparse.ArgumentParser:
    """The benchmark's flags (``mnist-jax bench`` passes its arguments through to them)."""
    p = _Parser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI-sized smoke run: small subsets, few steps (writes <device>-quick.*)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated models to benchmark: mlp, cnn (the default CNN) and "
                        "convnet (keras.io's small convnet) (default: all three)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers: keras,torch (default both; 'none' for none)")
    p.add_argument("--speedrun", action="store_true",
                   help="only the speedrun comparison: the record's one-epoch PyTorch recipe vs "
                        "'mnist-jax train --recipe speedrun', cold processes (writes "
                        "speedrun-<device>.*)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--speedrun: runs of each side, interleaved (default 3)")
    p.add_argument("--speedrun-seeds", type=int, default=16,
                   help="--speedrun: then one run of this many seeds in one program (0: none; "
                        "default 16)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="--speedrun: torch.set_num_threads for the PyTorch script (default: "
                        "PyTorch's own choice)")
    p.add_argument("--no-tta", action="store_true", help="skip the time-to-99%% run")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 comparison")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for <device>.json and <device>.md (default: benchmarks/results)")
    p.add_argument("--data-dir", help="folder with the MNIST archives (default: $MNIST_JAX_DATA_DIR)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic digits instead of MNIST (smoke tests without the data)")
    p.add_argument("--peer-timeout", type=float, default=1800.0,
                   help="seconds before a peer or the time-to-accuracy run is abandoned")
    return p


def _parse_list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    from mnist_jax.errors import UsageError
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if items == ["none"]:
        return []
    bad = [t for t in items if t not in allowed]
    if bad:
        raise UsageError(f"invalid {flag} {','.join(bad)!r}: choose from {', '.join(allowed)}")
    return items


def main(argv: Sequence[str] | None = None, prog: str = "bench.py") -> int:
    """Parse the benchmark's flags from ``argv`` (default: ``sys.argv[1:]``) and run it;
    bad flag values or data end with one line and the error's exit code."""
    from mnist_jax.errors import MnistJaxError
    args = build_parser(prog).parse_args(argv)
    try:
        return run_speedrun(args) if args.speedrun else run(args)
    except MnistJaxError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; writes ``<args.out>/<device>[-quick].{json,md}``."""
    import jax

    models_ = _parse_list(args.models, MODELS, "--models")
    peers = _parse_list(args.peers, PEERS, "--peers")
    p = plan(args.quick, accelerator=jax.devices()[0].platform != "cpu")
    flags = cpu_flags()
    dev = jax.devices()[0]
    cores = os.cpu_count()
    kind = cpu_model() if dev.platform == "cpu" else getattr(dev, "device_kind", str(dev))
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {
        "device": device_slug(dev.platform, kind, jax.device_count(), cores, flags),
        "quick": bool(args.quick), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device_info": {"platform": dev.platform, "kind": kind, "devices": jax.device_count(),
                        "cores": cores, "python": platform.python_version(), "jax": jax.__version__,
                        "machine": platform.machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "load_start": load_start, "amx": amx_report(flags) if dev.platform == "cpu" else None},
        "settings": {"batch_size": BATCH_SIZE, "optimizer": f"Adam(lr={LEARNING_RATE}, eps={ADAM_EPS})",
                     "dtype": "float32", "data": "synthetic" if args.synthetic else "MNIST (uint8 / 255)"},
        "method": [
            "FLOPs: 2 x multiply-adds of every Dense/Conv layer from its shapes; a training step "
            "counts forward + weight gradient + input gradient (none for the first layer); "
            "biases, activations, pooling, dropout, loss and Adam are not counted (< 1 %). "
            "GFLOP/s = training FLOPs per image x images/s.",
            "Ceiling: median GFLOP/s of a jit-compiled n x n x n jnp matmul on the same device.",
            "mnist-jax epochs drop the last partial batch (468 x 128 images); Keras runs 469 "
            "steps (60,000 images): the ratios compare time per image.",
            "Peers run in their own subprocesses (Keras with KERAS_BACKEND=jax and model.fit; "
            "PyTorch eager with torch.set_num_threads(cores)); CNN peers time a fixed number of "
            "steps per epoch, scaled to a full epoch.",
            "Evaluation: the 10,000 test images, compiled, median of repeated calls.",
        ] + ([
            "On the GPU: JAX's default fp32 precision (what training uses) and PyTorch with "
            "torch.set_float32_matmul_precision('high') may both use tf32 matrix units; the "
            "'highest'-precision fp32 ceiling is given too. Peers run whole epochs there. "
            "mnist-jax's s/epoch includes no host work (one compiled program per epoch); its "
            "train seconds are the sum of the epochs' wall times, compilation excluded.",
        ] if dev.platform != "cpu" else []),
        "models": {},
    }
    ds = load_data(args.data_dir, args.synthetic)
    results["settings"]["train_images"] = len(ds.train_labels)

    log("matmul ceiling")
    results["ceiling"] = matmul_ceiling(p["ceiling_n"], p["reps"])
    ceiling = results["ceiling"]["fp32_gflops"]

    for name in models_:
        entry: dict[str, Any] = {"flops_per_image": training_flops(name)}
        results["models"][name] = entry
        log(f"{name}: mnist-jax")
        entry["ours"] = measure_ours(name, subset(ds, p["train_images"][name]), p["epochs"][name],
                                     p["reps"])
        for peer in peers:
            log(f"{name}: {peer}")
            entry[peer] = run_peer(peer, name, epochs=p["peer_epochs"][name],
                                   steps=p["peer_steps"][name],
                                   data_dir=args.data_dir, synthetic=args.synthetic,
                                   timeout=args.peer_timeout, accelerator=dev.platform != "cpu")
        for peer in PEERS:
            entry.setdefault(peer, {"status": "skipped", "reason": "not requested (--peers)"})
        entry["ratios"] = compute_ratios(entry, ceiling)
        entry["ours"]["eval_floor_seconds"] = eval_floor_seconds(
            entry["flops_per_image"]["forward"], entry["ours"]["eval_images"], ceiling)
        if not args.no_bf16:
            log(f"{name}: bf16 vs fp32")
            acc = entry["ours"]["test_accuracy_per_epoch"]
            try:
                entry["bf16"] = measure_bf16(name, ds, p["bf16_steps"][name],
                                             p["bf16_train_images"][name], p["reps"],
                                             acc[0] if acc and not args.quick else None)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                entry["bf16"] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}

    if not args.no_tta:
        t = p["tta"]
        log(f"time to {TTA_TARGET:.0%} ({t['model']}, cold process)")
        results["time_to_accuracy"] = run_time_to_accuracy(
            t["model"], TTA_TARGET, t["max_epochs"], t["train_images"], args.data_dir,
            args.synthetic, args.peer_timeout)
        results["time_to_accuracy_recipes"] = []
        for t in p["tta_recipes"]:
            if t["model"] in models_:
                log(f"time to {TTA_TARGET:.0%} ({t['model']}, {t['recipe']}, cold process)")
                results["time_to_accuracy_recipes"].append(run_time_to_accuracy(
                    t["model"], TTA_TARGET, t["max_epochs"], None, args.data_dir,
                    args.synthetic, args.peer_timeout, t["recipe"]))

    results["device_info"]["load_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    busy = [v for v in (load_start, results["device_info"]["load_end"]) if v is not None]
    results["device_info"]["busy"] = bool(busy) and max(busy) > 1.25 * (cores or 1)
    results["targets"] = target_checks(results)
    print(format_table(results))
    json_path, md_path = write_results(results, args.out)
    print(f"results written to {json_path} and {md_path}")
    return 0


def _main_child(argv: Sequence[str]) -> int:
    """``python benchmarks/bench.py --child TASK_JSON``: one peer/TTA measurement."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    task = json.loads(argv[1])
    try:
        result = _child_main(task)
    except ImportError as e:
        result = missing(f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - the parent reports it
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    print(RESULT_PREFIX + json.dumps(result, default=float), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(_main_child(sys.argv[1:]))
    sys.exit(main())
