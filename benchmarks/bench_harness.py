"""What every benchmark script here shares: the fixed training settings, the device's
name, timing helpers, the data, the matmul ceiling, child processes and results files.

Pure helpers (ratios, medians, names) are tested without timing anything
(``tests/test_bench.py``).  Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mnist_jax.atomic import write_atomic
from mnist_jax.names import MODELS as ALL_MODELS

# What every implementation trains with: Adam as Keras has it, batch 128, float32.
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-7
# Benchmarked: the tutorial's models (the recipes' "smallcnn" has its own comparison,
# --speedrun; "bncnn" none yet).  "convnet" is keras.io's small "Simple
# MNIST convnet" (models.create_model("convnet")): the model that issue #3's planning
# figures (0.9 TFLOP per epoch, Keras 64 s/epoch) describe; the targets are held against
# the default CNN, the convnet's figures are reported beside it.
MODELS = tuple(m for m in ALL_MODELS if m in ("mlp", "cnn", "convnet"))
# A child process prints its result as one JSON line after this prefix.
RESULT_PREFIX = "MNIST_JAX_BENCH_RESULT "


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def measured_epochs(epoch_seconds: Sequence[float], warmup: int = 1) -> list[float]:
    """The epochs that count: all after the first ``warmup`` (all if there are too few)."""
    return list(epoch_seconds[warmup:]) if len(epoch_seconds) > warmup else list(epoch_seconds)


def training_flops(model_name: str, **model_kwargs: Any) -> dict[str, int]:
    """Matmul FLOPs per image of ``model_name`` (forward and one training step)."""
    from mnist_jax.models import create_model
    from mnist_jax.summary import flops_per_example
    return flops_per_example(create_model(model_name, **model_kwargs))


def achieved_gflops(train_flops_per_image: float, images_per_second: float) -> float:
    return train_flops_per_image * images_per_second / 1e9


def safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def missing(reason: str) -> dict[str, Any]:
    return {"status": "missing", "reason": reason}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_slug(platform_name: str, kind: str, count: int, cores: int | None = None,
                flags: set[str] | None = None) -> str:
    """File-name-safe device name: ``cpu-AMD-EPYC-2core`` or ``gpu-NVIDIA-H100-x8``.

    A CPU without AVX-512 (``flags`` from /proc/cpuinfo, read when not given) is named
    ``cpu-AMD-EPYC-noavx512-2core``: a VM reports one model name ("AMD EPYC") for CPU
    generations that run these benchmarks at different speeds, and the results of one must
    not overwrite the other's (this project's reference CPU has AVX-512)."""
    if platform_name == "cpu":
        flags = cpu_flags() if flags is None else flags
        isa = "" if not flags or "avx512f" in flags else "-noavx512"
        return f"cpu-{_slug(kind)}{isa}-{cores or os.cpu_count()}core"
    return f"{platform_name}-{_slug(kind)}" + (f"-x{count}" if count > 1 else "")


def script_header(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The fields a benchmark script's results file starts with: this device's slug (see
    :func:`device_slug`), the CPU, platform, jax version, date, and the command as run
    (``argv``: the script's arguments; None: ``sys.argv``'s)."""
    import jax
    dev = jax.devices()[0]
    args = argv if argv is not None else sys.argv[1:]
    return {"device": device_slug(dev.platform, cpu_model() if dev.platform == "cpu"
                                  else dev.device_kind, 1),
            "cpu": cpu_model(), "platform": platform.platform(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": f"python benchmarks/{script}" + "".join(f" {a}" for a in args)}


def parse_timing_args(p: argparse.ArgumentParser, argv: Sequence[str] | None, *, steps: int,
                      steps_help: str, rounds: int, rounds_help: str) -> argparse.Namespace:
    """Add a timing script's ``--steps``, ``--rounds`` and ``--out`` (the results folder,
    default ``benchmarks/results`` of this checkout) to ``p`` and parse ``argv``; counts
    below 1 are refused (exit 2)."""
    p.add_argument("--steps", type=int, default=steps, help=f"{steps_help} (default {steps})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for the results files")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    return args


def write_result_files(out_dir: str | os.PathLike[str], name: str, results: dict[str, Any],
                       markdown: str) -> Path:
    """Write ``<name>-<device>.json`` and ``.md`` atomically under ``out_dir``, print the
    markdown and where they went; return the common stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{results['device']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(results, indent=2, default=float) + "\n",
                 durable=False)
    write_atomic(stem.with_suffix(".md"), markdown, durable=False)
    print(markdown)
    print(f"written: {stem}.json, {stem}.md")
    return stem


def amx_report(flags: set[str]) -> dict[str, Any]:
    amx = sorted(f for f in flags if f.startswith("amx"))
    bf16 = sorted(f for f in flags if "bf16" in f)
    if amx:
        note = f"AMX present ({', '.join(amx)}): bf16 matmuls can use the AMX tiles."
    else:
        note = ("no AMX on this CPU (no amx_* flags in /proc/cpuinfo): bf16 mixed precision "
                "cannot reach AMX here" + (f"; it has {', '.join(bf16)} (bf16 dot products "
                                           "on AVX-512 vectors)" if bf16 else "") + ".")
    return {"amx_flags": amx, "bf16_flags": bf16, "note": note}


def load_data(data_dir: str | None, synthetic: bool):
    """Real MNIST (uint8), or a deterministic synthetic stand-in for smoke runs."""
    from mnist_jax import data as data_lib
    if not synthetic:
        return data_lib.load_dataset("mnist", data_dir)
    import numpy as np
    rng = np.random.default_rng(0)
    (tx, ty), (vx, vy) = (data_lib.synthetic_digits(rng, n, noise=60) for n in (60000, 10000))
    return data_lib.Dataset("synthetic", tx, ty, vx, vy, source="synthetic")


def subset(ds, n: int | None):
    import dataclasses
    if n is None or n >= len(ds.train_labels):
        return ds
    return dataclasses.replace(ds, train_images=ds.train_images[:n], train_labels=ds.train_labels[:n])


def timed(fn: Callable, *args, reps: int) -> list[float]:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times


def matmul_ceiling(n: int, reps: int) -> dict[str, Any]:
    """GFLOP/s of an n x n x n matmul under jit (median), fp32 and bf16, plus the
    MLP's own 128x784x784 matmul for reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    out: dict[str, Any] = {"n": n, "reps": reps}
    mm = jax.jit(lambda a, b: a @ b)
    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    for dtype in ("fp32", "bf16"):
        x = a if dtype == "fp32" else a.astype(jnp.bfloat16)
        times = timed(mm, x, x, reps=reps)
        out[f"{dtype}_gflops"] = 2 * n ** 3 / median(times) / 1e9
        out[f"{dtype}_gflops_best"] = 2 * n ** 3 / min(times) / 1e9
    if jax.devices()[0].platform != "cpu":
        # The default fp32 precision may use the matrix units' tf32 mode (it is what the
        # training runs get); full fp32 ("highest") is the other ceiling.
        exact = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
        out["fp32_highest_gflops"] = 2 * n ** 3 / median(timed(exact, a, a, reps=reps)) / 1e9
    x, w = a[:128, :784] if n >= 784 else jnp.ones((128, 784)), jnp.ones((784, 784), jnp.float32)
    times = timed(mm, x, w, reps=max(reps * 10, 30))
    out["mlp_shape_fp32_gflops"] = 2 * 128 * 784 * 784 / median(times) / 1e9
    return out


def run_child(task: dict[str, Any], timeout: float, env: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Run ``python benchmarks/bench.py --child TASK`` and return the result it prints."""
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("bench.py")), "--child",
           json.dumps(task)]
    # Several JAX processes share one GPU: none may grab 75 % of its memory up front.
    full_env = dict({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, **os.environ, **(env or {}))
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    found = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
    if not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(found[-1])
    result["process_started"] = started
    return result


def result_from_stdout(stdout: str) -> dict[str, Any] | None:
    """The last ``RESULT_PREFIX`` JSON line a child printed, or None."""
    found = [line[len(RESULT_PREFIX):] for line in stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
    return json.loads(found[-1]) if found else None


def timed_process(cmd: list[str], env: dict[str, str], timeout: float
                   ) -> tuple[subprocess.CompletedProcess | None, float]:
    """Run ``cmd`` to its exit; (the process or None on timeout, wall seconds from spawn)."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t
    return proc, time.perf_counter() - t


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
