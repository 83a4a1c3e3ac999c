"""Where a training step's time goes on this machine, against the matmul ceiling.

For each recipe named (default: ``speedrun`` and ``best``), compiles the program its
``mnist-jax train`` epoch runs (``run_steps`` with the recipe's model, optimizer,
augmentation and XLA options) over random digits, times it (median of several calls)
while measuring the process's CPU time, then runs it once more under JAX's profiler.
It reports:

* the wall time of a step, and how busy the cores were meanwhile: process CPU time over
  wall time × cores (a thread that spins while it waits counts as busy);
* the floor: the step's training FLOPs (:func:`mnist_jax.summary.flops_per_example`) at
  the fp32 matmul ceiling of all cores (``bench.matmul_ceiling``);
* the kernel time the profiler recorded per XLA thread (each kernel's own time, less the
  kernels it ran inline), summed by kind, classified by XLA's op names (the top ops are
  listed too): library matmuls (YNNPACK/XNNPACK/oneDNN fusions, dots, convolutions), the
  copies that build im2col (slices, stacks, concatenations, pads), the ReLU/pool
  selects, the scan's dynamic slices and updates, and everything else. A library's
  helper threads (YNNPACK's) record no events, so a matmul counts its caller's wall
  time, and the threads' recorded time understates how busy they were.

    python benchmarks/step_profile.py          # benchmarks/results/step-profile-<device>.{json,md}
    python benchmarks/step_profile.py speedrun --steps 4 --rounds 2 --out /tmp/p

Random digits: a step's cost does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mnist_jax as mj  # noqa: E402
from bench import (matmul_ceiling, parse_timing_args, script_header,  # noqa: E402
                   write_result_files)
from mnist_jax import run as run_lib  # noqa: E402
from mnist_jax.summary import flops_per_example  # noqa: E402
from mnist_jax.training import run_steps  # noqa: E402

# Kinds of kernel, by XLA's op name: first match wins (a fused select that writes
# into a scan's buffer counts as a scan buffer update).
KINDS = (
    ("matmul (library)", ("ynn_fusion", "xnn_fusion", "onednn", "dot", "convolution")),
    ("scan buffers (dynamic slices, updates)", ("dynamic",)),
    ("im2col copies (slices, stacks, pads)", ("slice", "stack", "concatenate", "pad")),
    ("ReLU / pool selects", ("select", "maximum", "compare")),
)
OTHER = "other (elementwise, reductions, optimizer)"
WORKER_PREFIX = "tf_XLA"  # XLA's threads; the Python thread only dispatches
# Events that are not kernels: the executor's and thread pool's own spans, the markers
# a kernel's completion leaves ("end: <op>") and Python frames.
NOT_KERNELS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "$")
CONTAINERS = re.compile(r"(while|call|conditional)(\.\d+)?$")


def kind_of(op: str) -> str:
    """The kind of kernel an XLA op name is (see :data:`KINDS`)."""
    name = op.lower()
    for kind, parts in KINDS:
        if any(p in name for p in parts):
            return kind
    return OTHER


def self_times(events: Iterable[dict[str, Any]]) -> dict[Any, list[tuple[str, float]]]:
    """Per thread, the (name, microseconds) of every kernel event: its duration less that
    of the events nested in it on the same thread (a kernel may run another inline while
    it waits). :data:`NOT_KERNELS` and the loop spans (``while``, ``call``,
    ``conditional``) are left out, their nested kernels kept."""
    by_tid: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        if (e.get("ph") == "X" and e.get("dur") and not e["name"].startswith(NOT_KERNELS)
                and not CONTAINERS.match(e["name"])):
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    out: dict[Any, list[tuple[str, float]]] = {}
    for tid, evs in by_tid.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        own = [float(e["dur"]) for e in evs]
        stack: list[int] = []
        for i, e in enumerate(evs):
            while stack and evs[stack[-1]]["ts"] + evs[stack[-1]]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]] -= e["dur"]
            stack.append(i)
        out[tid] = [(e["name"], max(t, 0.0)) for e, t in zip(evs, own)]
    return out


def summarize_trace(trace: dict[str, Any], steps: int) -> dict[str, Any]:
    """Kernel time per step (ms) of the XLA worker threads in a Chrome/Perfetto trace
    that covers ``steps`` training steps: per thread, per kind and per op."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_thread: dict[str, float] = {}
    kinds: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    for tid, kernels in self_times(events).items():
        name = names.get(tid, "")
        if not name.startswith(WORKER_PREFIX):
            continue
        busy = 0.0
        for op, us in kernels:
            busy += us
            kinds[kind_of(op)] += us
            ops[op] += us
        per_thread[f"{name} ({tid[1]})"] = busy / 1e3 / steps
    most = max(per_thread.values(), default=0.0)
    return {"thread_busy_ms": {k: v for k, v in per_thread.items() if v > most / 100},
            "kinds_ms": {k: v / 1e3 / steps for k, v in kinds.most_common()},
            "top_ops_ms": {k: v / 1e3 / steps for k, v in ops.most_common(12)}}


def _newest_trace(folder: Path) -> dict[str, Any]:
    files = sorted(folder.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"the profiler wrote no *.trace.json.gz under {folder}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def profile_recipe(recipe: str, steps: int, rounds: int) -> dict[str, Any]:
    """Compile, time and profile ``steps`` steps of ``recipe``'s training program."""
    config = mj.TrainConfig.from_recipe(recipe)
    model = run_lib.build_model(config)
    state = run_lib.init_state(config, model=model)  # the run's own: seed, rate, optimizer
    options = run_lib.step_options(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (steps, config.batch_size, 28, 28), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, (steps, config.batch_size)), jnp.int32)
    # the XLA options the run's epoch compiles with
    xla_options = dict(run_lib.epoch_compile_options(state, options)) or None
    t = time.perf_counter()
    fn = jax.jit(run_steps, static_argnums=(3, 4), compiler_options=xla_options).lower(
        state, x, y, None, options).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(fn(state, x, y))
    times, cpu = [], []
    for _ in range(rounds):
        c, t = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(fn(state, x, y))
        times.append((time.perf_counter() - t) / steps)
        cpu.append((_cpu_seconds() - c) / steps)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t = time.perf_counter()
            jax.block_until_ready(fn(state, x, y))
            traced_s = (time.perf_counter() - t) / steps
        profile = summarize_trace(_newest_trace(Path(tmp)), steps)
    print(f"{recipe}: compiled in {compile_s:.1f} s, {statistics.median(times) * 1e3:.1f} ms "
          "per step", flush=True)
    return {"recipe": recipe, "model": config.model, "batch_size": config.batch_size,
            "steps": steps, "rounds": rounds, "compile_seconds": compile_s,
            "xla_options": xla_options, "step_seconds": statistics.median(times),
            "step_seconds_all": times, "cpu_seconds_per_step": statistics.median(cpu),
            "traced_step_seconds": traced_s,
            "train_flops_per_step": flops_per_example(model)["train"] * config.batch_size,
            **profile}


def derived(r: dict[str, Any], ceiling_gflops: float, cores: int) -> dict[str, Any]:
    """The cores' utilisation, the matmuls' share of the kernel time and the floor: the
    step's training FLOPs at the matmul ceiling."""
    kernels = sum(r["kinds_ms"].values())
    return {"cpu_utilisation": r["cpu_seconds_per_step"] / (cores * r["step_seconds"]),
            "matmul_share": r["kinds_ms"].get(KINDS[0][0], 0.0) / kernels if kernels else None,
            "floor_step_seconds": r["train_flops_per_step"] / (ceiling_gflops * 1e9)}


def format_markdown(results: dict[str, Any]) -> str:
    c = results["ceiling"]
    lines = [f"# Where a training step's time goes: {results['device']}", "",
             (f"{results['cpu']}, {results['cores']} cores, jax {results['jax']}, "
              f"{results['date']}; `{results['command']}`. fp32 matmul ceiling "
              f"{c['fp32_gflops']:.0f} GFLOP/s (a {c['n']}³ matmul on all cores)."), ""]
    for r in results["recipes"]:
        d = r["derived"]
        lines += [f"## `{r['recipe']}` ({r['model']}, batch {r['batch_size']})", "",
                  (f"- step: **{r['step_seconds'] * 1e3:.1f} ms** (median of {r['rounds']} "
                   f"calls of {r['steps']} steps; compiled in {r['compile_seconds']:.1f} s); "
                   f"its {r['train_flops_per_step'] / 1e9:.2f} GFLOP of matmuls would take "
                   f"**{d['floor_step_seconds'] * 1e3:.1f} ms** at the ceiling"),
                  (f"- the cores were {d['cpu_utilisation']:.0%} busy (process CPU time over "
                   "wall time × cores; a thread that spins while it waits counts as busy)"),
                  (f"- kernel time recorded by the profiler ({r['traced_step_seconds'] * 1e3:.1f}"
                   " ms per step under it), per XLA thread: "
                   + ", ".join(f"{v:.1f}" for v in r["thread_busy_ms"].values())
                   + " ms per step; a library's helper threads (YNNPACK's) record none, so "
                   "a matmul's time is its caller's wall time"), "",
                  "| kernel kind | thread ms per step | share |", "| --- | --- | --- |"]
        total = sum(r["kinds_ms"].values())
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in r["kinds_ms"].items()]
        lines += ["", "Top ops (thread ms per step): " + ", ".join(
            f"`{k}` {v:.1f}" for k, v in r["top_ops_ms"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=["speedrun", "best"],
                   help=f"recipes to profile (default: speedrun best; any of {list(mj.RECIPES)})")
    args = parse_timing_args(p, argv, steps=8, steps_help="steps per call",
                             rounds=5, rounds_help="timed calls per recipe")
    unknown = [r for r in args.recipes if r not in mj.RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {list(mj.RECIPES)}")
    recipes = [profile_recipe(r, args.steps, args.rounds) for r in args.recipes]
    ceiling = matmul_ceiling(2048, 10)
    cores = len(os.sched_getaffinity(0))
    for r in recipes:
        r["derived"] = derived(r, ceiling["fp32_gflops"], cores)
    results = {**script_header("step_profile.py", argv), "cores": cores, "ceiling": ceiling,
               "recipes": recipes}
    write_result_files(args.out, "step-profile", results, format_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
