"""Eight seeds in one compiled program vs eight runs one after another.

Trains the tutorial MLP (or ``--model``/``--hidden``) on real MNIST for
``--epochs`` epochs with ``--seeds`` (default 0..7), in two (or more) ways:

* ``sequential``: one :func:`mnist_jax.run.fit` per seed, one after another
  (each compiles its own program, as eight separate ``mnist-jax train`` would);
* ``together``: one :func:`~mnist_jax.run.fit` with all seeds, i.e. ONE compiled
  program over a stacked train state (``mnist-jax train --seeds 0,...,7``),
  with the model axis handled the way the package does it on this device
  (``--model-axis`` picks ``vmap`` or ``map`` explicitly, to compare both).

Strategies are run in interleaved rounds (``--rounds``) so that a busy shared
machine slows them alike; for each we report the median over rounds of

* ``train_s``: wall seconds of the epochs (sum of ``epoch_seconds``),
* ``total_s``: wall seconds of the whole ``fit`` calls (device put, compile,
  epochs, final evaluation), and ``compile_s``,
* ``cpu_s``: CPU seconds (user + sys) the process used meanwhile: on a shared
  machine this is the steadier measure of the work done.

Writes ``benchmarks/results/seeds_vmap-<device>.json`` and ``.md``.

    MNIST_JAX_DATA_DIR=... python benchmarks/seeds_vmap.py --epochs 3 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mnist_jax import data as data_lib  # noqa: E402
from mnist_jax import training  # noqa: E402
from mnist_jax.config import TrainConfig  # noqa: E402
from mnist_jax.run import device_description, fit  # noqa: E402
from mnist_jax.rundir import git_commit, library_versions  # noqa: E402


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _with_model_axis(axis: str | None):
    """Context: make ``fit`` put the models on axis ``axis`` ("vmap"/"map")."""
    import contextlib

    import mnist_jax.run as run_mod

    @contextlib.contextmanager
    def ctx():
        env = getattr(training, "MODEL_AXIS_ENV", None)
        if axis is not None and env is None:
            raise SystemExit(f"this mnist_jax has no model-axis choice (cannot force {axis!r})")
        old = os.environ.get(env) if env else None
        cache = getattr(run_mod, "_compiled_fns", None)
        if axis is not None:
            os.environ[env] = axis
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
        try:
            yield
        finally:
            if axis is not None:
                if old is None:
                    os.environ.pop(env, None)
                else:
                    os.environ[env] = old
            if hasattr(cache, "cache_clear"):
                cache.cache_clear()

    return ctx()


def run_sequential(base: TrainConfig, ds) -> dict:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    train = compile_s = 0.0
    accs = []
    for seed in base.seeds:
        r = fit(dataclasses.replace(base, seeds=(seed,)), ds)
        train += sum(r.timings["epoch_seconds"])
        compile_s += r.timings["compile_seconds"]
        accs.append(float(r.test["accuracy"]))
    return {"train_s": train, "compile_s": compile_s, "total_s": time.perf_counter() - t0,
            "cpu_s": _cpu_seconds() - cpu0, "test_accuracy": accs}


def run_together(base: TrainConfig, ds, axis: str | None) -> dict:
    with _with_model_axis(axis):
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        r = fit(base, ds)
        total = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    return {"train_s": sum(r.timings["epoch_seconds"]), "compile_s": r.timings["compile_seconds"],
            "total_s": total, "cpu_s": cpu,
            "test_accuracy": [float(a) for a in np.atleast_1d(r.test["accuracy"])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", default="", help="MLP hidden sizes (default: the tutorial's 784)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--strategies", default="sequential,together",
                   help="comma-separated: sequential, together, together-vmap, together-map")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    base = TrainConfig(model=args.model, epochs=args.epochs, checkpoint_every=0,
                       seeds=tuple(int(s) for s in args.seeds.split(",")),
                       hidden=tuple(int(h) for h in args.hidden.split(",") if h),
                       data_dir=args.data_dir).validate()
    ds = data_lib.load_dataset(base.dataset, base.data_dir)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    runners = {"sequential": lambda: run_sequential(base, ds),
               "together": lambda: run_together(base, ds, None),
               "together-vmap": lambda: run_together(base, ds, "vmap"),
               "together-map": lambda: run_together(base, ds, "map")}
    rounds: dict[str, list[dict]] = {s: [] for s in strategies}
    loads = []
    for i in range(args.rounds):
        order = strategies if i % 2 == 0 else strategies[::-1]
        for s in order:
            r = runners[s]()
            rounds[s].append(r)
            loads.append(os.getloadavg()[0])
            print(f"round {i + 1} {s:14s} train {r['train_s']:7.1f} s  total {r['total_s']:7.1f} s"
                  f"  compile {r['compile_s']:5.1f} s  cpu {r['cpu_s']:7.1f} s  "
                  f"acc {np.mean(r['test_accuracy']):.4f}", flush=True)

    med = {s: {k: statistics.median(r[k] for r in rs)
               for k in ("train_s", "total_s", "compile_s", "cpu_s")} for s, rs in rounds.items()}
    dev = device_description()
    name = f"{dev['platform']}-{dev['kind']}".replace(" ", "_").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "seeds_vmap", "config": base.to_dict(), "num_models": base.num_models,
              "rounds": rounds, "median": med, "device": dev, "cpu_count": os.cpu_count(),
              "load_average_during": loads, "platform": platform.platform(),
              "versions": library_versions(), "git_commit": git_commit(),
              "model_axis_default": getattr(training, "default_model_axis", lambda: "vmap")()}
    (out / f"seeds_vmap-{name}.json").write_text(json.dumps(record, indent=2) + "\n")

    lines = [f"# {base.num_models} seeds in one program vs one after another ({name})", "",
             f"{base.model} (hidden {base.hidden or 'default'}), {base.epochs} epochs, batch "
             f"{base.batch_size}, real MNIST; median of {args.rounds} interleaved rounds; "
             f"{os.cpu_count()} CPUs, load average during the runs "
             f"{min(loads):.1f}-{max(loads):.1f} (shared machine: wall times are noisy, "
             "CPU seconds are steadier). Default model axis on this device: "
             f"`{record['model_axis_default']}`.", "",
             "| strategy | train wall (s) | total wall incl. compile (s) | compile (s) | CPU (s) |",
             "|---|---:|---:|---:|---:|"]
    for s, m in med.items():
        lines.append(f"| {s} | {m['train_s']:.1f} | {m['total_s']:.1f} | {m['compile_s']:.1f} | "
                     f"{m['cpu_s']:.1f} |")
    if "sequential" in med:
        lines.append("")
        for s, m in med.items():
            if s != "sequential":
                q = med["sequential"]
                lines.append(f"- {s} vs sequential: train wall ×{m['train_s'] / q['train_s']:.2f}, "
                             f"total wall ×{m['total_s'] / q['total_s']:.2f}, "
                             f"CPU ×{m['cpu_s'] / q['cpu_s']:.2f} (below 1: faster)")
    lines.append("")
    lines.append(f"Command: `python benchmarks/seeds_vmap.py {' '.join(sys.argv[1:])}`")
    (out / f"seeds_vmap-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
