"""A user's nn.Conv / nnx.Conv nets inside mnist-jax's compiled epoch (their convolutions
rewritten by ``mnist_jax.convrewrite``) against the built-in fast paths and Flax's per-step
loop.

Rows, all timed over the same ``--steps`` training steps of random digits (a step's cost
does not depend on the pixels), in ``--rounds`` interleaved repetitions whose order
alternates (a busy machine slows them alike):

speedrun layers (Conv5x5-24, pool, ReLU, Conv3x3-32, pool, ReLU, Dense 256, Dense 10), batch 256:

* ``smallcnn``: the built-in preset (its own fast conv stack), mnist-jax's compiled epoch;
* ``linen_conv``: the same layers as a user's linen module with ``nn.Conv`` and
  ``nn.max_pool``, mnist-jax's compiled epoch (``--impl auto``: rewritten);
* ``linen_conv_xla``: the same with ``--impl xla``: what ``fit`` ran before the rewrite;
* ``nnx_conv``: the same layers as an NNX module (``nnx.Conv``), mnist-jax's compiled epoch;
* ``flax_loop_linen``: the linen module in Flax's MNIST-example loop: one jitted train
  step per batch (XLA's convolution, as Flax runs it);
* ``flax_loop_nnx``: the NNX module in Flax's NNX tutorial loop (``nnx.Optimizer``,
  ``nnx.jit`` step per batch, float32 batches from the host);

``scripts/resnet_seeds.py``'s ResNet (BatchNorm residual blocks), batch 128:

* ``resnet_im2col``: the script's net as written (its hand-written im2col ``Conv``);
* ``resnet_conv``: the same net with plain ``nn.Conv`` (stride and SAME padding as
  ``nn.Conv`` has them), mnist-jax's compiled epoch;
* ``resnet_conv_defaults``: the same, its epoch compiled with XLA's default options
  instead of the library fusions ``fit`` picks for it (what they are worth);
* ``flax_loop_resnet_conv``: the ``nn.Conv`` net in Flax's per-step loop.

Every row uses Adam.
Reported: milliseconds per step (median over rounds) and the targets of issue #31:
user modules within 1.2x of ``smallcnn``, the ``nn.Conv`` ResNet within 1.2x of the
im2col one, each mnist-jax row faster than its net in Flax's per-step loop.

    python benchmarks/user_convs.py                  # benchmarks/results/user-convs-<device>.{json,md}
    python benchmarks/user_convs.py --steps 5 --rounds 1 --out /tmp/u
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mnist_jax as mj  # noqa: E402
from bench import parse_timing_args, script_header, write_result_files  # noqa: E402
from mnist_jax import run as run_lib  # noqa: E402
from mnist_jax import training  # noqa: E402

MEAN, STD = 0.1307, 0.3081
SPEEDRUN_BATCH, RESNET_BATCH = 256, 128
USER_OVER_BUILTIN_TARGET = 1.2
LABELS = {
    "smallcnn": "built-in smallcnn (fast conv stack), compiled epoch",
    "linen_conv": "linen nn.Conv, compiled epoch (rewritten)",
    "linen_conv_xla": "linen nn.Conv, compiled epoch, --impl xla (before)",
    "nnx_conv": "NNX nnx.Conv, compiled epoch (rewritten)",
    "flax_loop_linen": "linen nn.Conv, Flax loop (jit per batch)",
    "flax_loop_nnx": "NNX nnx.Conv, Flax NNX tutorial loop (nnx.jit per batch)",
    "resnet_im2col": "ResNet, hand-written im2col Conv, compiled epoch",
    "resnet_conv": "ResNet, nn.Conv, compiled epoch (rewritten)",
    "resnet_conv_defaults": "ResNet, nn.Conv, compiled epoch (rewritten), XLA's default options",
    "flax_loop_resnet_conv": "ResNet, nn.Conv, Flax loop (jit per batch)",
}


class LinenSpeedrun(nn.Module):
    """The speedrun's layers as a user writes them in linen."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ((x - MEAN) / STD)[..., None]
        x = nn.relu(nn.max_pool(nn.Conv(24, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
        x = nn.relu(nn.max_pool(nn.Conv(32, (3, 3), padding="VALID")(x), (2, 2), (2, 2)))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class NnxSpeedrun(nnx.Module):
    """The speedrun's layers as a user writes them in NNX."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 24, kernel_size=(5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(24, 32, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(5 * 5 * 32, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = ((x - MEAN) / STD)[..., None]
        x = nnx.relu(nnx.max_pool(self.conv1(x), (2, 2), (2, 2)))
        x = nnx.relu(nnx.max_pool(self.conv2(x), (2, 2), (2, 2)))
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


class NnConv(nn.Module):
    """``resnet_seeds.Conv``'s interface on plain ``nn.Conv``."""

    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                       padding="SAME", use_bias=self.use_bias)(x)


def resnet_module(plain_conv: bool):
    """``scripts/resnet_seeds.py``, loaded as its own module; with ``plain_conv`` its
    ``Conv`` is :class:`NnConv` (the blocks look it up when called)."""
    spec = importlib.util.spec_from_file_location(
        f"resnet_seeds_{'conv' if plain_conv else 'im2col'}", ROOT / "scripts" / "resnet_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # flax's dataclass transform looks its module up
    spec.loader.exec_module(mod)
    if plain_conv:
        mod.Conv = NnConv
    return mod.ResNet()


def _digits(steps: int, batch: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.integers(0, 256, (steps * batch, 28, 28), dtype=np.uint8)),
            jnp.asarray(rng.integers(0, 10, steps * batch).astype(np.int32)))


def _state(model, batch: int) -> mj.TrainState:
    config = mj.TrainConfig(batch_size=batch, seeds=(0,), epochs=1)
    return mj.init_state(config, model=model, optimizer=mj.make_optimizer(1e-3))


def epoch_runner(model, batch: int, steps: int, convs: str,
                 xla_options: bool = True) -> tuple[Callable[[], None], float]:
    """mnist-jax's compiled epoch (what ``fit`` runs) over ``steps`` batches; with
    ``xla_options`` off, compiled with XLA's defaults instead of the options ``fit`` picks
    (``run.epoch_compile_options``)."""
    state = _state(model, batch)
    x, y = _digits(steps, batch)
    options = training.StepOptions(convs=convs)
    fns = training.compile_fns(batch, 1, options=options,
                               epoch_options=run_lib.epoch_compile_options(state, options)
                               if xla_options else ())
    t = time.perf_counter()
    epoch = fns.train_epoch.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t
    held = {"state": state}

    def run() -> None:
        held["state"], m = epoch(held["state"], x, y)
        jax.block_until_ready(m)

    run()
    return run, compile_s


def flax_step_runner(model, batch: int, steps: int) -> tuple[Callable[[], None], float]:
    """Flax's MNIST-example loop: one jitted train step (XLA's convolution) per batch,
    the batches already on the device."""
    state = _state(model, batch)
    x, y = _digits(steps, batch)
    xs = [x[i * batch:(i + 1) * batch] for i in range(steps)]
    ys = [y[i * batch:(i + 1) * batch] for i in range(steps)]
    step = jax.jit(training.train_step, static_argnums=3, donate_argnums=0)
    options = training.StepOptions(convs="xla")
    t = time.perf_counter()
    held = {"state": step(state, xs[0], ys[0], options)[0]}
    jax.block_until_ready(held["state"])
    compile_s = time.perf_counter() - t

    def run() -> None:
        for a, b in zip(xs, ys):
            held["state"], m = step(held["state"], a, b, options)
        jax.block_until_ready(m)

    run()
    return run, compile_s


def nnx_loop_runner(steps: int) -> tuple[Callable[[], None], float]:
    """Flax's NNX MNIST tutorial loop: ``nnx.Optimizer`` and an ``nnx.jit`` train step per
    batch, the batches prepared beforehand as float32 numpy arrays."""
    import optax
    model = NnxSpeedrun(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    rng = np.random.default_rng(1)
    b = SPEEDRUN_BATCH
    images = rng.integers(0, 256, (steps * b, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, steps * b).astype(np.int32)
    batches = [((images[i * b:(i + 1) * b] / 255.0).astype(np.float32), labels[i * b:(i + 1) * b])
               for i in range(steps)]

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    model.train()
    t = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, *batches[0]))
    compile_s = time.perf_counter() - t

    def run() -> None:
        for x, y in batches:
            loss = train_step(model, optimizer, x, y)
        jax.block_until_ready(loss)

    run()
    return run, compile_s


def runners(steps: int, rows: list[str]) -> dict[str, Callable[[], tuple[Callable, float]]]:
    make = {
        "smallcnn": lambda: epoch_runner(mj.create_model("smallcnn"), SPEEDRUN_BATCH, steps,
                                         "auto"),
        "linen_conv": lambda: epoch_runner(LinenSpeedrun(), SPEEDRUN_BATCH, steps, "auto"),
        "linen_conv_xla": lambda: epoch_runner(LinenSpeedrun(), SPEEDRUN_BATCH, steps, "xla"),
        "nnx_conv": lambda: epoch_runner(NnxSpeedrun, SPEEDRUN_BATCH, steps, "auto"),
        "flax_loop_linen": lambda: flax_step_runner(LinenSpeedrun(), SPEEDRUN_BATCH, steps),
        "flax_loop_nnx": lambda: nnx_loop_runner(steps),
        "resnet_im2col": lambda: epoch_runner(resnet_module(False), RESNET_BATCH, steps, "auto"),
        "resnet_conv": lambda: epoch_runner(resnet_module(True), RESNET_BATCH, steps, "auto"),
        "resnet_conv_defaults": lambda: epoch_runner(resnet_module(True), RESNET_BATCH, steps,
                                                     "auto", xla_options=False),
        "flax_loop_resnet_conv": lambda: flax_step_runner(resnet_module(True), RESNET_BATCH,
                                                          steps),
    }
    return {r: make[r] for r in rows}


LOADS: list[float] = []
"""The 1-minute load average after each round."""


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_rows(steps: int, rounds: int, rows: list[str]) -> dict[str, Any]:
    calls, compile_s = {}, {}
    for name, make in runners(steps, rows).items():
        calls[name], compile_s[name] = make()
        print(f"compiled {name}: {compile_s[name]:.1f} s", flush=True)
    wall: dict[str, list[float]] = {n: [] for n in calls}
    cpu: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            c, t = _cpu_seconds(), time.perf_counter()
            calls[name]()
            wall[name].append((time.perf_counter() - t) / steps * 1e3)
            cpu[name].append((_cpu_seconds() - c) / steps * 1e3)
        LOADS.append(os.getloadavg()[0])
    return {n: {"label": LABELS[n], "ms_per_step": statistics.median(wall[n]),
                "ms_per_step_rounds": wall[n], "cpu_ms_per_step": statistics.median(cpu[n]),
                "compile_s": compile_s[n]} for n in calls}


TARGETS = [  # (row, reference row, target ratio: row / reference must be below)
    ("linen_conv", "smallcnn", USER_OVER_BUILTIN_TARGET),
    ("nnx_conv", "smallcnn", USER_OVER_BUILTIN_TARGET),
    ("resnet_conv", "resnet_im2col", USER_OVER_BUILTIN_TARGET),
    ("linen_conv", "flax_loop_linen", 1.0),
    ("nnx_conv", "flax_loop_nnx", 1.0),
    ("resnet_conv", "flax_loop_resnet_conv", 1.0),
    ("linen_conv", "linen_conv_xla", None),
    ("resnet_conv", "resnet_conv_defaults", None),
]


def targets(rows: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for a, b, limit in TARGETS:
        if a in rows and b in rows:
            per_round = [x / y for x, y in zip(rows[a]["ms_per_step_rounds"],
                                               rows[b]["ms_per_step_rounds"])]
            ratio = rows[a]["ms_per_step"] / rows[b]["ms_per_step"]
            out.append({"row": a, "over": b, "ratio": ratio,
                        "median_per_round": statistics.median(per_round),
                        "target": limit, "met": None if limit is None else ratio < limit})
    return out


def format_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# A user's nn.Conv / nnx.Conv in the compiled epoch ({results['date']})", "",
             f"CPU: {results['cpu']} ({results['cores']} cores), jax {results['jax']}, "
             f"flax {results['flax']}. Command: `{results['command']}`.", "",
             f"{s['steps']} training steps per timed call, {s['rounds']} interleaved rounds "
             f"(median); speedrun rows at batch {SPEEDRUN_BATCH}, ResNet rows at batch "
             f"{RESNET_BATCH}. Load average during the rounds: "
             f"{results['load_average'][0]:.1f}-{results['load_average'][1]:.1f}. "
             f"Machine: {results['machine_note']}", "",
             "| row | what | ms / step | CPU ms / step | compile s |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, r in results["rows"].items():
        lines.append(f"| `{name}` | {r['label']} | {r['ms_per_step']:.1f} | "
                     f"{r['cpu_ms_per_step']:.1f} | {r['compile_s']:.1f} |")
    lines += ["", "| ratio | value (of medians) | median per round | target | met |",
              "| --- | ---: | ---: | --- | --- |"]
    for t in results["targets"]:
        target = "-" if t["target"] is None else f"< {t['target']}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| `{t['row']}` / `{t['over']}` | {t['ratio']:.2f} | "
                     f"{t['median_per_round']:.2f} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(LABELS), help=f"comma-separated, of {list(LABELS)}")
    p.add_argument("--machine-note", default="",
                   help="what else ran on the machine meanwhile (written into the results)")
    args = parse_timing_args(p, argv, steps=30, steps_help="training steps per timed call",
                             rounds=3, rounds_help="interleaved repetitions of each row")
    rows = [r for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in LABELS]
    if unknown or not rows:
        p.error(f"unknown row(s) {unknown}; choose from {list(LABELS)}")
    timed = time_rows(args.steps, args.rounds, rows)
    import flax
    results = {**script_header("user_convs.py", argv), "flax": flax.__version__,
               "cores": len(os.sched_getaffinity(0)),
               "settings": {"steps": args.steps, "rounds": args.rounds, "rows": rows},
               "load_average": [min(LOADS), max(LOADS)],
               "machine_note": args.machine_note or "nothing else noted.",
               "rows": timed, "targets": targets(timed)}
    write_result_files(args.out, "user-convs", results, format_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
