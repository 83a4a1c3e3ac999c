"""What a single model at the records' accuracy costs on this machine (issue #13).

Times one training step of the ``best`` recipe's ``bncnn`` and of ``RecordResNet``
(``scripts/resnet_seeds.py --net record``: the residual net behind ttdoucet/mnist's
99.70-99.79 %), each inside mnist-jax's compiled epoch loop with its augmentation drawn
on the device, interleaved over several rounds in one process; then the training time
per seed that each one's epochs take at that speed (54,000 training digits: the
validation split of 0.1 held out), and the ratio of the two.

    python benchmarks/record_cost.py     # benchmarks/results/record-cost-<device>.{json,md}
    python benchmarks/record_cost.py --steps 2 --rounds 2 --out /tmp/r

Random digits: a step's cost does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mnist_jax as mj  # noqa: E402
from bench import parse_timing_args, script_header, write_result_files  # noqa: E402
from mnist_jax import run as run_lib  # noqa: E402
from mnist_jax.data import TRAIN_EXAMPLES, training_count  # noqa: E402
from mnist_jax.summary import flops_per_example  # noqa: E402
from mnist_jax.training import StepOptions, create_train_state, run_steps  # noqa: E402
import resnet_seeds as rs  # noqa: E402  (scripts/)

# 60,000 less a validation split of 0.1 (54,000), as the best recipe's runs
TRAIN_DIGITS = training_count(TRAIN_EXAMPLES, 0.1)
# bncnn runs this many times --steps per timed call: a call allocates its temporaries
# afresh, which a few of its ~10x cheaper steps would not amortise.
CHEAP_STEPS = 10


def contenders() -> dict[str, dict[str, Any]]:
    """name -> model, optimizer, step options, batch size and epochs of its recipe, and
    its steps per timed call (times --steps)."""
    best = mj.TrainConfig.from_recipe("best", validation_split=0.1)
    rec = rs.NETS["record"]
    schedule_steps = TRAIN_DIGITS // rec["batch_size"] * rec["epochs"]
    return {
        "bncnn (best recipe)": {
            "model": run_lib.build_model(best), "tx": run_lib.build_optimizer(best, TRAIN_EXAMPLES),
            "options": run_lib.step_options(best), "batch": best.batch_size,
            "epochs": best.epochs, "call_steps": CHEAP_STEPS},
        "RecordResNet (resnet_seeds.py --net record)": {
            "model": rs.RecordResNet(),
            "tx": rs.make_optimizer(rec["lr"], schedule_steps, rec["warmup"]),
            "options": StepOptions(augment=mj.AugmentSpec.parse(rec["augment"])),
            "batch": rec["batch_size"], "epochs": rec["epochs"], "call_steps": 1},
    }


def measure(steps: int, rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    runs = {}
    for name, c in contenders().items():
        n = c["call_steps"] * steps
        state = create_train_state(c["model"], c["tx"], 0)
        x = jnp.asarray(rng.integers(0, 256, (n, c["batch"], 28, 28), dtype=np.uint8))
        y = jnp.asarray(rng.integers(0, 10, (n, c["batch"])), jnp.int32)
        t = time.perf_counter()
        fn = jax.jit(run_steps, static_argnums=(3, 4)).lower(
            state, x, y, None, c["options"]).compile()
        compile_s = time.perf_counter() - t
        runs[name] = dict(c, fn=fn, args=(state, x, y), compile_s=compile_s, times=[],
                          steps=n)
        print(f"{name}: compiled in {compile_s:.1f} s", flush=True)
    for r in range(rounds):  # interleaved: a slow spell of the machine slows both alike
        for name, run in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(run["fn"](*run["args"]))
            run["times"].append((time.perf_counter() - t) / run["steps"])
            print(f"round {r + 1}: {name}: {run['times'][-1] * 1e3:.0f} ms/step", flush=True)
    out = {}
    for name, run in runs.items():
        step_s = statistics.median(run["times"])
        steps_per_seed = TRAIN_DIGITS // run["batch"] * run["epochs"]
        out[name] = {"batch_size": run["batch"], "epochs": run["epochs"],
                     "steps_per_call": run["steps"],
                     "forward_macs_per_digit": flops_per_example(run["model"])["forward"] // 2,
                     "step_seconds": step_s, "step_seconds_all": run["times"],
                     "compile_seconds": run["compile_s"], "steps_per_seed": steps_per_seed,
                     "training_seconds_per_seed": step_s * steps_per_seed}
    return out


def format_markdown(results: dict[str, Any]) -> str:
    lines = [f"# What a record-scale single model costs: {results['device']}", "",
             (f"{results['cpu']}, jax {results['jax']}, {results['date']}; "
              f"`{results['command']}` ({results['rounds']} interleaved rounds; medians "
              "of the time per step)."), "",
             ("| model | multiply-adds per digit | batch × epochs | s per step | "
              "training per seed (54,000 digits) |"), "| --- | --- | --- | --- | --- |"]
    for name, r in results["models"].items():
        lines.append(f"| {name} | {r['forward_macs_per_digit'] / 1e6:,.0f} M | "
                     f"{r['batch_size']} × {r['epochs']} | {r['step_seconds']:.3f} | "
                     f"{r['training_seconds_per_seed'] / 60:,.1f} min |")
    ratio = results["ratio_per_seed"]
    lines += ["", f"RecordResNet / bncnn: **{ratio:.1f}×** the training time per seed.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_timing_args(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]), argv,
        steps=3, steps_help="steps per timed call of RecordResNet, 10x that of bncnn",
        rounds=3, rounds_help="interleaved rounds")
    models = measure(args.steps, args.rounds)
    names = list(models)
    results = {
        **script_header("record_cost.py", argv), "steps": args.steps, "rounds": args.rounds,
        "models": models,
        "ratio_per_seed": (models[names[1]]["training_seconds_per_seed"]
                           / models[names[0]]["training_seconds_per_seed"]),
    }
    write_result_files(args.out, "record-cost", results, format_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
