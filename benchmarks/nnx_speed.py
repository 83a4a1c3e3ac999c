"""An NNX model against its linen twin inside mnist-jax's compiled epoch, and against
Flax's own NNX tutorial loop on the same net and batch.

For each net (``--nets``) and batch size (``--batch-sizes``):

1. **The same function.** The NNX model and its linen twin have the same layers under the
   same names. The linen twin's initial parameters (and BatchNorm statistics) are copied
   into the NNX model's trees, and both are called through the train state's contract
   (``state.apply_fn(state.variables, x, ...)``): the inference logits of the benchmarked
   nets, and with dropout at 0 the training logits, the updated BatchNorm statistics and
   the gradients of the loss must agree to float32 tolerance (:data:`RTOL`, :data:`ATOL`).
2. **Timing, interleaved.** Three ways to train ``--steps`` steps of the net, timed in
   ``--rounds`` repetitions whose order alternates (a busy machine slows them alike):

   * ``nnx``: mnist-jax's compiled epoch (``training.compile_fns(...).train_epoch``, the
     program ``fit`` runs) on the NNX model, from the copied parameters;
   * ``linen``: the same program on the linen twin;
   * ``flax_loop``: Flax's NNX MNIST tutorial loop on the NNX model: ``nnx.Optimizer``,
     ``nnx.MultiMetric`` and an ``nnx.jit`` train step called once per batch, the
     batches prepared beforehand as float32 numpy arrays (its tf.data pipeline is not
     counted).

   All three use the tutorial's ``optax.adamw(0.005, 0.9)`` and the same batch size.

Reported: wall seconds per step (median over rounds), process CPU seconds per step, and
the ratios NNX / linen (target <= 1.05) and mnist-jax NNX / Flax loop (target <= 1.0),
each as the ratio of the medians and the median of the per-round ratios.

The nets: ``mlp``, the tutorial MLP's layers (Linear 784 -> Dropout 0.4 -> relu ->
Linear 10); ``cnn``, the CNN of Flax's NNX MNIST tutorial (``scripts/nnx_tutorial.py``:
Conv, BatchNorm, Dropout, avg_pool, Linear). Random digits: a step's cost does not depend
on the pixels.

    python benchmarks/nnx_speed.py          # benchmarks/results/nnx-speed-<device>.{json,md}
    python benchmarks/nnx_speed.py --nets mlp --batch-sizes 32 --steps 20 --rounds 2 --out /tmp/n
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import mnist_jax as mj  # noqa: E402
from bench import parse_timing_args, script_header, write_result_files  # noqa: E402
from mnist_jax import run as run_lib  # noqa: E402
from mnist_jax import training  # noqa: E402
from mnist_jax.nnxmodel import NNX_STATE  # noqa: E402
from nnx_tutorial import CNN, LEARNING_RATE, MOMENTUM  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5
"""float32 tolerance of the same-function check (``np.allclose``)."""
CONTENDERS = {"nnx": "mnist-jax, NNX model", "linen": "mnist-jax, linen twin",
              "flax_loop": "Flax tutorial loop (nnx.jit per batch)"}
NNX_OVER_LINEN_TARGET = 1.05
NNX_OVER_FLAX_LOOP_TARGET = 1.0


# ---- the nets: an NNX module and its linen twin, same layers under the same names ------

class NNXMLP(nnx.Module):
    """The tutorial MLP's layers in NNX: Linear 784 -> Dropout -> relu -> Linear 10."""

    def __init__(self, dropout: float = 0.4, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(784, 784, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.linear2 = nnx.Linear(784, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.dropout(self.linear1(x))))


class LinenMLP(nn.Module):
    """:class:`NNXMLP` in linen."""

    dropout: float = 0.4

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(
            nn.Dense(784, name="linear1")(x))
        return nn.Dense(10, name="linear2")(nn.relu(x))


class LinenCNN(nn.Module):
    """The NNX tutorial's CNN (``scripts/nnx_tutorial.py``) in linen."""

    dropout: float = 0.025

    @nn.compact
    def __call__(self, x, train: bool):
        def norm(name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                                name=name)

        def pool(x):
            return nn.avg_pool(x, (2, 2), strides=(2, 2))

        x = x[..., None] if x.ndim == 3 else x
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout1")(
            nn.Conv(32, (3, 3), name="conv1")(x))
        x = pool(nn.relu(norm("batch_norm1")(x)))
        x = pool(nn.relu(norm("batch_norm2")(nn.Conv(64, (3, 3), name="conv2")(x))))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(256, name="linear1")(x)
        x = nn.relu(nn.Dropout(self.dropout, deterministic=not train, name="dropout2")(x))
        return nn.Dense(10, name="linear2")(x)


NETS: dict[str, tuple[Callable[..., nnx.Module], type[nn.Module]]] = {
    "mlp": (NNXMLP, LinenMLP), "cnn": (CNN, LinenCNN)}


def twins(net: str, dropout: float | None = None) -> tuple[Callable[..., nnx.Module], nn.Module]:
    """(the NNX class, or a partial of it, and the linen instance) of ``net``;
    ``dropout`` overrides both nets' dropout rate."""
    nnx_cls, linen_cls = NETS[net]
    if dropout is None:
        return nnx_cls, linen_cls()
    return functools.partial(nnx_cls, dropout=dropout), linen_cls(dropout=dropout)


def tutorial_optimizer() -> optax.GradientTransformation:
    """The NNX tutorial's optimizer: ``optax.adamw(0.005, 0.9)``."""
    return optax.adamw(LEARNING_RATE, MOMENTUM)


# ---- the same function from the same parameters ---------------------------------------

def copy_tree(source: Any, like: Any, where: str = "") -> Any:
    """``like``'s nested dict with every leaf taken from ``source`` at the same path;
    ValueError when ``source`` lacks a path or holds another shape there."""
    if isinstance(like, dict):
        if not isinstance(source, dict) or set(source) != set(like):
            raise ValueError(f"{where or 'the root'}: the linen tree has "
                             f"{sorted(source) if isinstance(source, dict) else 'a leaf'}, "
                             f"the NNX tree {sorted(like)}")
        return {k: copy_tree(source[k], v, f"{where}/{k}") for k, v in like.items()}
    if np.shape(source) != np.shape(like):
        raise ValueError(f"{where}: linen shape {np.shape(source)}, NNX {np.shape(like)}")
    return jnp.asarray(source, like.dtype)


def twin_states(net: str, batch_size: int, dropout: float | None = None
                ) -> tuple[mj.TrainState, mj.TrainState]:
    """(NNX state, linen state): both made by mnist-jax from seed 0 with the tutorial's
    optimizer; the NNX state then holds the linen state's parameters and statistics."""
    nnx_make, linen_model = twins(net, dropout)
    config = mj.TrainConfig(batch_size=batch_size, seeds=(0,), epochs=1)
    tx = tutorial_optimizer()
    linen = mj.init_state(config, model=linen_model, optimizer=tx)
    fresh = mj.init_state(config, model=nnx_make, optimizer=tx)
    params = copy_tree(linen.params, fresh.params)
    model_state = dict(fresh.model_state)
    if NNX_STATE in model_state:
        model_state[NNX_STATE] = copy_tree(linen.model_state.get("batch_stats", {}),
                                           model_state[NNX_STATE])
    nnx_state = fresh.replace(params=params, model_state=model_state,
                              opt_state=fresh.tx.init(params))
    return nnx_state, linen


def _train_call(state: mj.TrainState, x: jax.Array, labels: jax.Array):
    """(loss, (logits, updated model_state)) and the loss's gradients of one training
    call through the state's contract (dropout keyed by a fixed key)."""
    mutable = list(state.model_state) or False

    def loss_fn(params):
        out = state.apply_fn({"params": params, **state.model_state}, x, train=True,
                             rngs={"dropout": jax.random.PRNGKey(1)}, mutable=mutable)
        logits, updated = out if mutable else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updated)

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def _max_diff(a: Any, b: Any) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return float("inf")
    return max((float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb)),
               default=0.0)


def _close(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.allclose(x, y, rtol=RTOL, atol=ATOL)
                                      for x, y in zip(la, lb))


def same_function(net: str, batch_size: int = 16,
                  states: tuple[mj.TrainState, mj.TrainState] | None = None,
                  train_states: tuple[mj.TrainState, mj.TrainState] | None = None
                  ) -> dict[str, Any]:
    """Whether the NNX model and its linen twin compute the same function from the same
    parameters (see the module docstring): the largest absolute differences and
    ``same``. ``states`` / ``train_states`` ((NNX, linen), default :func:`twin_states`
    with the nets' dropout and with dropout 0) are what is compared."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (batch_size, 28, 28)) / 255.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    nnx_s, linen_s = states or twin_states(net, batch_size)
    nnx_eval = nnx_s.apply_fn(nnx_s.variables, x, train=False)
    linen_eval = linen_s.apply_fn(linen_s.variables, x, train=False)
    nnx_t, linen_t = train_states or twin_states(net, batch_size, dropout=0.0)
    (nnx_loss, (nnx_logits, nnx_stats)), nnx_grads = _train_call(nnx_t, x, labels)
    (linen_loss, (linen_logits, linen_stats)), linen_grads = _train_call(linen_t, x, labels)
    nnx_stats, linen_stats = nnx_stats.get(NNX_STATE, {}), linen_stats.get("batch_stats", {})
    pairs = {"inference_logits": (nnx_eval, linen_eval),
             "training_logits": (nnx_logits, linen_logits),
             "training_loss": (nnx_loss, linen_loss),
             "updated_batch_stats": (nnx_stats, linen_stats),
             "gradients": (nnx_grads, linen_grads)}
    out: dict[str, Any] = {"batch_size": batch_size, "rtol": RTOL, "atol": ATOL,
                           "params": int(sum(np.size(p) for p in jax.tree.leaves(nnx_s.params))),
                           "batch_stats": int(sum(np.size(p) for p in
                                                  jax.tree.leaves(nnx_s.model_state)))}
    out["max_abs_diff"] = {k: _max_diff(a, b) for k, (a, b) in pairs.items()}
    out["same"] = all(_close(a, b) for a, b in pairs.values())
    return out


# ---- timing ----------------------------------------------------------------------------

def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _digits(steps: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (steps * batch_size, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, steps * batch_size).astype(np.int32))


def _program_cost(compiled: Any) -> dict[str, Any]:
    """XLA's cost analysis of a compiled program: FLOPs, bytes accessed, temporaries."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
                "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    except Exception:  # noqa: BLE001 - a backend without the analyses
        return {}


def mnist_jax_runner(state: mj.TrainState, images: np.ndarray, labels: np.ndarray,
                     batch_size: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """(a call that trains one epoch of ``len(images) // batch_size`` steps with
    mnist-jax's compiled epoch program, carrying the state; its compile seconds and
    :func:`_program_cost`)."""
    config = mj.TrainConfig(batch_size=batch_size, seeds=(0,), epochs=1)
    options = run_lib.step_options(config)
    fns = training.compile_fns(batch_size, 1, options=options,
                               epoch_options=run_lib.epoch_compile_options(state, options))
    x, y = jnp.asarray(images), jnp.asarray(labels)
    t = time.perf_counter()
    epoch = fns.train_epoch.lower(state, x, y).compile()
    info = {"compile_seconds": time.perf_counter() - t, **_program_cost(epoch)}
    held = {"state": state}

    def run() -> None:
        held["state"], metrics = epoch(held["state"], x, y)
        jax.block_until_ready(metrics)

    run()  # first call: buffers allocated, caches warm
    return run, info


def flax_loop_runner(make: Callable[..., nnx.Module], images: np.ndarray, labels: np.ndarray,
                     batch_size: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """(a call that trains ``len(images) // batch_size`` steps as Flax's NNX MNIST
    tutorial does: one ``nnx.jit`` train step per batch; its compile seconds)."""
    model = make(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tutorial_optimizer(), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                              loss=nnx.metrics.Average("loss"))
    steps = len(images) // batch_size
    batches = [{"image": (images[i * batch_size:(i + 1) * batch_size] / 255.0).astype(np.float32),
                "label": labels[i * batch_size:(i + 1) * batch_size]} for i in range(steps)]

    def loss_fn(model, batch):
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits=logits, labels=batch["label"]).mean()
        return loss, logits

    @nnx.jit
    def train_step(model, optimizer, metrics, batch):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, batch)
        metrics.update(loss=loss, logits=logits, labels=batch["label"])
        optimizer.update(model, grads)

    model.train()
    t = time.perf_counter()
    train_step(model, optimizer, metrics, batches[0])
    jax.block_until_ready(nnx.state(model))
    compile_s = time.perf_counter() - t

    def run() -> None:
        for batch in batches:
            train_step(model, optimizer, metrics, batch)
        jax.block_until_ready(nnx.state(model))

    run()
    return run, {"compile_seconds": compile_s}


def _ratio_stats(a: list[float], b: list[float]) -> dict[str, Any]:
    per_round = [x / y for x, y in zip(a, b)]
    return {"of_medians": statistics.median(a) / statistics.median(b),
            "median_per_round": statistics.median(per_round), "per_round": per_round}


def time_row(net: str, batch_size: int, steps: int, rounds: int) -> dict[str, Any]:
    """Compile the three contenders for ``net`` at ``batch_size``, then time ``steps``
    steps of each in ``rounds`` interleaved repetitions (alternating order)."""
    images, labels = _digits(steps, batch_size)
    nnx_state, linen_state = twin_states(net, batch_size)
    check = same_function(net, states=(nnx_state, linen_state))
    runners, programs = {}, {}
    runners["nnx"], programs["nnx"] = mnist_jax_runner(nnx_state, images, labels, batch_size)
    runners["linen"], programs["linen"] = mnist_jax_runner(linen_state, images, labels,
                                                           batch_size)
    runners["flax_loop"], programs["flax_loop"] = flax_loop_runner(NETS[net][0], images,
                                                                   labels, batch_size)
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    loads = []
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            c, t = _cpu_seconds(), time.perf_counter()
            runners[name]()
            wall[name].append((time.perf_counter() - t) / steps)
            cpu[name].append((_cpu_seconds() - c) / steps)
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in wall.items()}
    print(f"{net} batch {batch_size}: " + ", ".join(f"{k} {v * 1e3:.2f} ms/step"
                                                      for k, v in med.items()), flush=True)
    nnx_linen = _ratio_stats(wall["nnx"], wall["linen"])
    nnx_loop = _ratio_stats(wall["nnx"], wall["flax_loop"])
    # CPU time (all threads) is steadier than wall time when other jobs share the cores
    nnx_linen["cpu_of_medians"] = (statistics.median(cpu["nnx"])
                                   / statistics.median(cpu["linen"]))
    nnx_loop["cpu_of_medians"] = (statistics.median(cpu["nnx"])
                                  / statistics.median(cpu["flax_loop"]))
    return {"net": net, "batch_size": batch_size, "steps": steps, "rounds": rounds,
            "same_function": check, "programs": programs,
            "step_seconds": wall, "cpu_seconds_per_step": cpu,
            "median_step_seconds": med,
            "median_cpu_seconds_per_step": {k: statistics.median(v) for k, v in cpu.items()},
            "load_average_after_rounds": loads,
            "nnx_over_linen": nnx_linen, "nnx_over_flax_loop": nnx_loop,
            "targets": {"nnx_over_linen": nnx_linen["of_medians"] <= NNX_OVER_LINEN_TARGET,
                        "nnx_not_slower_than_flax_loop":
                            nnx_loop["of_medians"] <= NNX_OVER_FLAX_LOOP_TARGET}}


# ---- results -----------------------------------------------------------------------------

def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def format_markdown(results: dict[str, Any]) -> str:
    """The results page: the same-function check, then one timing row per net and batch."""
    s = results["settings"]
    lines = [f"# NNX vs linen inside mnist-jax's compiled epoch, and vs Flax's tutorial loop: "
             f"{results['device']}", "",
             f"{results['cpu']}, {results['cores']} cores, jax {results['jax']}, flax "
             f"{results['flax']}, {results['date']}; `{results['command']}`.",
             f"{s['steps']} steps per timed call, {s['rounds']} interleaved rounds (order "
             "alternating); random digits; optimizer `optax.adamw(0.005, 0.9)` (the NNX "
             "tutorial's) for all three. Load average during the rounds "
             f"{results['load_average'][0]:.1f}-{results['load_average'][1]:.1f} on "
             f"{results['cores']} cores: {results['machine_note']}", "",
             "## The same function from the same parameters", "",
             "The linen twin's initial parameters and BatchNorm statistics copied into the NNX "
             "model's trees; both called through the train state's `apply_fn`. Largest "
             f"absolute differences (np.allclose rtol {RTOL:g}, atol {ATOL:g}; training with "
             "dropout 0):", "",
             "| net | params | inference logits | training logits | loss | BatchNorm stats "
             "| gradients | same |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for net, c in results["same_function"].items():
        d = c["max_abs_diff"]
        lines.append(f"| {net} | {c['params']:,} | {d['inference_logits']:.1e} | "
                     f"{d['training_logits']:.1e} | {d['training_loss']:.1e} | "
                     f"{d['updated_batch_stats']:.1e} | {d['gradients']:.1e} | "
                     f"{_yes(c['same'])} |")
    lines += ["", "## Step time", "",
              "Wall ms per training step, median over rounds (CPU ms per step, all threads, "
              "in brackets). Ratios of wall times: of the medians (median of the per-round "
              "ratios; ratio of the CPU medians).", "",
              "| net | batch | mnist-jax NNX | mnist-jax linen | Flax tutorial loop | "
              f"NNX / linen (target <= {NNX_OVER_LINEN_TARGET}) | "
              "mnist-jax NNX / Flax loop (target <= 1) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        m, c = r["median_step_seconds"], r["median_cpu_seconds_per_step"]
        cells = [f"{m[k] * 1e3:.2f} ({c[k] * 1e3:.1f})" for k in CONTENDERS]
        a, b = r["nnx_over_linen"], r["nnx_over_flax_loop"]
        lines.append(f"| {r['net']} | {r['batch_size']} | " + " | ".join(cells)
                     + f" | {a['of_medians']:.3f} ({a['median_per_round']:.3f}; "
                       f"{a['cpu_of_medians']:.3f}) {_yes(r['targets']['nnx_over_linen'])} | "
                       f"{b['of_medians']:.3f} ({b['median_per_round']:.3f}; "
                       f"{b['cpu_of_medians']:.3f}) "
                       f"{_yes(r['targets']['nnx_not_slower_than_flax_loop'])} |")
    lines += ["", "The two mnist-jax epoch programs as XLA compiled them (cost analysis of "
              "the whole epoch; compile seconds; the Flax loop's: its first step):", "",
              "| net | batch | NNX GFLOP | linen GFLOP | NNX / linen bytes accessed | "
              "NNX / linen temporaries (MiB) | compile s (NNX, linen, Flax loop) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        a, b, f = (r["programs"][k] for k in CONTENDERS)
        if a.get("flops") and b.get("flops"):
            lines.append(
                f"| {r['net']} | {r['batch_size']} | {a['flops'] / 1e9:.4f} | "
                f"{b['flops'] / 1e9:.4f} | {a['bytes_accessed'] / b['bytes_accessed']:.5f} | "
                f"{a['temp_bytes'] / 2**20:.2f} / {b['temp_bytes'] / 2**20:.2f} | "
                f"{a['compile_seconds']:.1f}, {b['compile_seconds']:.1f}, "
                f"{f['compile_seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def _csv(text: str, cast: Callable[[str], Any]) -> list[Any]:
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="mlp,cnn", help=f"comma-separated, of {list(NETS)}")
    p.add_argument("--batch-sizes", default="32,128",
                   help="comma-separated (default 32,128: the NNX tutorial's, mnist-jax's)")
    p.add_argument("--machine-note", default="",
                   help="what else ran on the machine meanwhile (written into the results)")
    args = parse_timing_args(p, argv, steps=200, steps_help="training steps per timed call",
                             rounds=3, rounds_help="interleaved repetitions of each contender")
    nets = _csv(args.nets, str)
    unknown = [n for n in nets if n not in NETS]
    if unknown or not nets:
        p.error(f"unknown net(s) {unknown}; choose from {list(NETS)}")
    try:
        sizes = _csv(args.batch_sizes, int)
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers")
    if not sizes or min(sizes) < 1:
        p.error("--batch-sizes must be positive integers")
    checks = {net: same_function(net) for net in nets}
    rows = [time_row(net, b, args.steps, args.rounds) for net in nets for b in sizes]
    loads = [x for r in rows for x in r["load_average_after_rounds"]]
    import flax
    results = {**script_header("nnx_speed.py", argv), "flax": flax.__version__,
               "cores": len(os.sched_getaffinity(0)),
               "settings": {"steps": args.steps, "rounds": args.rounds, "nets": nets,
                            "batch_sizes": sizes, "optimizer": "optax.adamw(0.005, 0.9)"},
               "load_average": [min(loads), max(loads)],
               "machine_note": args.machine_note or "nothing else noted.",
               "same_function": checks, "rows": rows}
    write_result_files(args.out, "nnx-speed", results, format_markdown(results))
    return 0 if all(c["same"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
