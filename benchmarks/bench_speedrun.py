"""``mnist-jax bench --speedrun``: the one-epoch record's recipe as a PyTorch script
against ``mnist-jax train --recipe speedrun``, each a cold process, interleaved, plus one
run of many seeds in one program; writes ``speedrun-<device>.{json,md}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench_harness import (RESULT_PREFIX, cpu_model, device_slug, load_data, log, median, missing,
                           result_from_stdout, safe_ratio, timed_process, write_result_files)
from bench_peers import peer_available
from bench_results import fmt


# Targets: our training time <= 0.5 x PyTorch's, our whole process <= 0.75 x PyTorch's.
SPEEDRUN_TARGETS = {"train_seconds": 0.5, "process_seconds": 0.75}
SPEEDRUN_ACCURACY_TARGET = 0.99  # mean test accuracy over the seeds after one epoch
# (side, key suffix): ours compiling / reading XLA's cache; the record's script / NHWC
SPEEDRUN_OURS = (("ours", ""), ("ours_warm", "_warm"))
SPEEDRUN_PEERS = (("torch", ""), ("torch_cl", "_cl"))


# The record's recipe (tuomaso/train_mnist_fast) as a PyTorch user runs it: a standalone
# script, the data already in memory as tensors (standardised), its Net, Adam(1e-2,
# betas (0.7, 0.9)), OneCycleLR over the epoch's steps without momentum cycling, batch
# 256, one epoch (the last partial batch dropped, as mnist-jax does).  It imports
# neither JAX nor this project, so its process time is PyTorch's alone.
TORCH_SPEEDRUN_SCRIPT = r"""
import json, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

args = json.loads(sys.argv[1])
if args.get("threads"):
    torch.set_num_threads(args["threads"])
torch.manual_seed(args["seed"])
data = np.load(args["data"])
MEAN, STD, BATCH = 0.1307, 0.3081, 256


def tensors(images, labels):
    x = torch.from_numpy(images).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


x, y = tensors(data["train_images"], data["train_labels"])
xt, yt = tensors(data["test_images"], data["test_labels"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5)
        self.conv2 = nn.Conv2d(24, 32, 3)
        self.fc1 = nn.Linear(800, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


model = Net()
if args.get("channels_last"):  # not in the record's script: NHWC, oneDNN's faster layout here
    model = model.to(memory_format=torch.channels_last)
    x, xt = (t.contiguous(memory_format=torch.channels_last) for t in (x, xt))
steps = len(x) // BATCH
opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.7, 0.9))
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps,
                                            cycle_momentum=False)
t = time.perf_counter()
model.train()
perm = torch.randperm(len(x))
for i in range(steps):
    idx = perm[i * BATCH:(i + 1) * BATCH]
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
train_seconds = time.perf_counter() - t
model.eval()
with torch.no_grad():
    correct = sum(int((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum())
                  for i in range(0, len(xt), 1000))
print(args["prefix"] + json.dumps({
    "status": "ok", "train_seconds": train_seconds, "test_accuracy": correct / len(xt),
    "steps": steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
    "channels_last": bool(args.get("channels_last")),
    "imported_jax": "jax" in sys.modules}), flush=True)
"""


def seeds_flag(n: int) -> str:
    """``--seeds`` for seeds 0..n-1: "0,1,...,n-1"."""
    if n < 1:
        raise ValueError(f"need at least one seed, got {n}")
    return ",".join(str(i) for i in range(n))


def ours_from_results(results: dict[str, Any], process_seconds: float) -> dict[str, Any]:
    """One ``mnist-jax train`` run's figures from its ``results.json``: training seconds
    (the epochs' wall time, compilation excluded), compile seconds, test accuracy (per
    seed, their mean and minimum when several) and the whole process's seconds."""
    import numpy as np
    if results.get("status") != "completed":
        return {"status": "error", "error": f"run status {results.get('status')!r}",
                "process_seconds": process_seconds}
    accs = results["test_accuracy"]
    accs = [float(a) for a in (accs if isinstance(accs, list) else [accs])]
    return {"status": "ok", "train_seconds": float(sum(results["epoch_seconds"])),
            "compile_seconds": float(results["compile_seconds"]),
            "data_seconds": results.get("data_seconds"),
            "run_seconds": results.get("total_seconds"),
            "process_seconds": process_seconds, "seeds": len(accs),
            "test_accuracy": accs[0] if len(accs) == 1 else accs,
            "test_accuracy_mean": float(np.mean(accs)), "test_accuracy_min": float(min(accs))}


def speedrun_summary(torch_runs: Sequence[dict[str, Any]], ours_runs: Sequence[dict[str, Any]],
                     warm_runs: Sequence[dict[str, Any]] = (),
                     channels_last_runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Medians of the successful runs of each side, the ratios ours / PyTorch and whether
    each ratio meets :data:`SPEEDRUN_TARGETS` (None when a side has no successful run).
    ``warm_runs``: ours again with XLA's compilation cache warm (``ours_warm``,
    ``ratios_warm``, ``targets_warm``). ``channels_last_runs``: PyTorch again with NHWC
    tensors (``torch_cl``; ours against it in ``ratios_cl``/``ratios_warm_cl``, ...)."""
    def med(runs, key):
        return median([r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None])

    out: dict[str, Any] = {}
    sides = (("torch", torch_runs), ("ours", ours_runs)) + (
        (("ours_warm", warm_runs),) if warm_runs else ()) + (
        (("torch_cl", channels_last_runs),) if channels_last_runs else ())
    for side, runs in sides:
        ok = [r for r in runs if r.get("status") == "ok"]
        keys = ("train_seconds", "process_seconds", "test_accuracy") + (
            ("compile_seconds",) if not side.startswith("torch") else ())
        out[side] = {"runs": len(runs), "ok": len(ok), **{k: med(ok, k) for k in keys}}
    for ours, suffix in SPEEDRUN_OURS:
        for peer, peer_suffix in SPEEDRUN_PEERS:
            if ours not in out or peer not in out:
                continue
            ratios = {k: safe_ratio(out[ours][k], out[peer][k]) for k in SPEEDRUN_TARGETS}
            out["ratios" + suffix + peer_suffix] = ratios
            out["targets" + suffix + peer_suffix] = {
                k: {"target": t, "value": ratios[k],
                    "met": None if ratios[k] is None else ratios[k] <= t}
                for k, t in SPEEDRUN_TARGETS.items()}
    return out


def format_speedrun_markdown(results: dict[str, Any]) -> str:
    """The speedrun comparison's Markdown report (``speedrun-<device>.md``)."""
    s, f = results["summary"], fmt
    out = [f"# Speedrun: mnist-jax vs the record's PyTorch recipe, {results.get('device', '?')}", "",
           f"Measured {results.get('date', '?')} with `{results.get('command', 'bench.py --speedrun')}`"
           f" (load average {results.get('load_start')} at the start, "
           f"{results.get('load_end')} at the end). Each side ran {results.get('rounds')} times as "
           "a cold process, interleaved; medians.", "",
           "| | training s | whole process s | compile s | test accuracy |", "|---|---|---|---|---|"]
    threads = f", {results['torch_threads']} threads" if results.get("torch_threads") else ""
    torch_name = f"PyTorch {results.get('torch_version', '?')} (the record's script{threads}"
    ours_name = "mnist-jax `train --recipe speedrun`"
    labels = {"torch": torch_name + ")", "torch_cl": torch_name + ", channels_last)",
              "ours": ours_name, "ours_warm": ours_name + ", XLA's compilation cache warm"}
    for side, label in labels.items():
        if side in s:
            o = s[side]
            compiled = f(o["compile_seconds"], ".2f") if "compile_seconds" in o else "-"
            out.append(f"| {label} | {f(o['train_seconds'], '.2f')} | "
                       f"{f(o['process_seconds'], '.2f')} | {compiled} | "
                       f"{f(o['test_accuracy'], '.4f')} |")
    out += ["", "| ratio ours / PyTorch | value | target | met |", "|---|---|---|---|"]
    for suffix, what in (("", ""), ("_warm", ", XLA cache warm"), ("_cl", " vs channels_last"),
                         ("_warm_cl", ", XLA cache warm, vs channels_last")):
        for k, tgt in s.get("targets" + suffix, {}).items():
            met = {True: "yes", False: "NO", None: "not measured"}[tgt["met"]]
            out.append(f"| {k.replace('_', ' ')}{what} | {f(tgt['value'], '.3f')} | "
                       f"<= {tgt['target']} | {met} |")
    runs = results.get("runs", {})
    out += ["", "Every run (seconds: training / whole process; accuracy):", ""]
    for side in ("torch", "torch_cl", "ours", "ours_warm"):
        for r in runs.get(side, []):
            if r.get("status") == "ok":
                out.append(f"- {side}: {f(r['train_seconds'], '.2f')} / "
                           f"{f(r['process_seconds'], '.2f')}; {f(r['test_accuracy'], '.4f')}"
                           f" (load average before: {r.get('load_before')})")
            else:
                out.append(f"- {side}: {r.get('status')} ({r.get('error') or r.get('reason')})")
    seeds = results.get("seeds_run")
    if seeds:
        out += ["", f"## {seeds.get('seeds', '?')} seeds in one program", ""]
        if seeds.get("status") == "ok":
            accs = seeds["test_accuracy"]
            accs = accs if isinstance(accs, list) else [accs]
            out += [f"`mnist-jax train --recipe speedrun --seeds {seeds_flag(len(accs))}`: "
                    f"mean test accuracy {f(seeds['test_accuracy_mean'], '.4f')} (target >= "
                    f"{SPEEDRUN_ACCURACY_TARGET}: "
                    f"{'met' if seeds['test_accuracy_mean'] >= SPEEDRUN_ACCURACY_TARGET else 'NOT met'}), "
                    f"minimum {f(seeds['test_accuracy_min'], '.4f')}; training "
                    f"{f(seeds['train_seconds'], '.2f')} s "
                    f"({f(seeds['train_seconds'] / len(accs), '.2f')} s per seed), compile "
                    f"{f(seeds['compile_seconds'], '.2f')} s, whole process "
                    f"{f(seeds['process_seconds'], '.2f')} s.", "",
                    "Per seed: " + ", ".join(f"{a:.4f}" for a in accs) + "."]
        else:
            out.append(f"{seeds.get('status')}: {seeds.get('error')}")
    out += ["", "Notes:", ""] + [f"- {n}" for n in results.get("notes", [])]
    return "\n".join(out) + "\n"


def _speedrun_torch(data_file: Path, seed: int, timeout: float, threads: int | None = None,
                    channels_last: bool = False) -> dict[str, Any]:
    if not peer_available("torch"):
        return missing("torch is not installed")
    args = json.dumps({"data": str(data_file), "seed": seed, "prefix": RESULT_PREFIX,
                       "threads": threads, "channels_last": channels_last})
    proc, seconds = timed_process([sys.executable, "-c", TORCH_SPEEDRUN_SCRIPT, args],
                                   dict(os.environ), timeout)
    if proc is None:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    result = result_from_stdout(proc.stdout)
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return dict(result, process_seconds=seconds)


def _mnist_jax_command() -> list[str]:
    """This environment's ``mnist-jax`` console script (else ``python -m mnist_jax.cli``)."""
    script = Path(sys.executable).with_name("mnist-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mnist_jax.cli"]


def _speedrun_ours(out_dir: Path, seeds: int, timeout: float, xla_cache: Path | None = None
                   ) -> dict[str, Any]:
    """``mnist-jax train --recipe speedrun`` as a cold process; it compiles its programs
    unless ``xla_cache`` names a folder for XLA's compilation cache."""
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = _mnist_jax_command() + ["train", "--recipe", "speedrun", "--out", str(out_dir),
                                  "--quiet"] + (["--seeds", seeds_flag(seeds)] if seeds > 1 else [])
    # this checkout's code, as every child of the benchmark runs it
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update({"JAX_COMPILATION_CACHE_DIR": str(xla_cache)} if xla_cache is not None
               else {"MNIST_JAX_XLA_CACHE": "0"})
    proc, seconds = timed_process(cmd, env, timeout)
    if proc is None:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    results_file = out_dir / "results.json"
    if proc.returncode != 0 or not results_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return ours_from_results(json.loads(results_file.read_text()), seconds)


def run_speedrun(args: argparse.Namespace) -> int:
    """``--speedrun``: the record's PyTorch recipe and ``mnist-jax train --recipe speedrun``
    as cold processes, ``--rounds`` times each, interleaved, plus (``--speedrun-seeds``)
    one run of that many seeds in one program; writes ``speedrun-<device>.{json,md}``."""
    import tempfile

    import jax
    import numpy as np

    from mnist_jax.errors import UsageError
    if args.rounds < 1 or args.speedrun_seeds < 0:
        raise UsageError("--rounds must be >= 1 and --speedrun-seeds >= 0")
    dev = jax.devices()[0]
    kind = cpu_model() if dev.platform == "cpu" else getattr(dev, "device_kind", str(dev))
    device = device_slug(dev.platform, kind, jax.device_count(), os.cpu_count())
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    # Loading here fills mnist-jax's data cache: every run of ours then finds it warm.
    ds = load_data(args.data_dir, False)
    if args.data_dir:
        os.environ["MNIST_JAX_DATA_DIR"] = args.data_dir
    runs: dict[str, list[dict[str, Any]]] = {"torch": [], "torch_cl": [], "ours": [],
                                             "ours_warm": []}
    with tempfile.TemporaryDirectory(prefix="mnist-jax-speedrun-") as tmp:
        # PyTorch's warm "cache": the same uint8 arrays, uncompressed, ready to load.
        data_file = Path(tmp) / "mnist.npz"
        np.savez(data_file, train_images=ds.train_images, train_labels=ds.train_labels,
                 test_images=ds.test_images, test_labels=ds.test_labels)
        # "ours" compiles every time; "ours_warm" finds XLA's cache filled by a first,
        # unmeasured run, as every run after a configuration's first on a machine does.
        xla = Path(tmp) / "xla"
        log("speedrun: filling XLA's compilation cache (not measured)")
        _speedrun_ours(Path(tmp) / "run", 1, args.peer_timeout, xla)
        for r in range(args.rounds):
            order = ("torch", "ours", "torch_cl", "ours_warm")
            for side in order if r % 2 == 0 else order[::-1]:
                log(f"speedrun round {r + 1}/{args.rounds}: {side}")
                load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
                runs[side].append(dict(_speedrun_torch(data_file, r, args.peer_timeout,
                                                       args.torch_threads, side == "torch_cl")
                                       if side.startswith("torch") else
                                       _speedrun_ours(Path(tmp) / "run", 1, args.peer_timeout,
                                                      xla if side == "ours_warm" else None),
                                       load_before=load))
        seeds_run = None
        if args.speedrun_seeds:
            log(f"speedrun: {args.speedrun_seeds} seeds in one program")
            seeds_run = _speedrun_ours(Path(tmp) / "seeds", args.speedrun_seeds,
                                       args.peer_timeout)
    torch_ok = [r for r in runs["torch"] if r.get("status") == "ok"]
    results = {
        "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python benchmarks/bench.py --speedrun" + (
            f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
            f" --speedrun-seeds {args.speedrun_seeds}" if args.speedrun_seeds != 16 else "") + (
            f" --torch-threads {args.torch_threads}" if args.torch_threads else ""),
        "rounds": args.rounds, "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_version": torch_ok[0]["torch"] if torch_ok else None,
        "torch_threads": torch_ok[0]["threads"] if torch_ok else None,
        "jax_version": jax.__version__, "cores": os.cpu_count(),
        "runs": runs,
        "summary": speedrun_summary(runs["torch"], runs["ours"], runs["ours_warm"],
                                    runs["torch_cl"]),
        "seeds_run": seeds_run,
        "notes": [
            "Training seconds: PyTorch's loop over the epoch's 234 steps of 256 (wall clock); "
            "mnist-jax's `epoch_seconds` from its results.json (the compiled epoch, compilation "
            "excluded and reported apart).",
            "Whole process: from spawning the command to its exit (interpreter start, imports, "
            "data, compilation, training, evaluation of the 10,000 test images and, for "
            "mnist-jax, writing the run folder with its checkpoint). Both read the data from a "
            "warm cache: mnist-jax its own, PyTorch the same arrays in an uncompressed .npz. "
            "mnist-jax compiles its programs in every 'ours' run (MNIST_JAX_XLA_CACHE=0) and "
            "reads them from XLA's compilation cache in every 'ours_warm' run (filled by one "
            "unmeasured run first, as any run after a configuration's first on a machine).",
            "PyTorch: " + (f"torch.set_num_threads({args.torch_threads})"
                           if args.torch_threads else "its default threads")
            + " (torch.get_num_threads() in the JSON), eager mode, "
            "the script in benchmarks/bench_speedrun.py (TORCH_SPEEDRUN_SCRIPT) written from the "
            "record's description; seed = round number. 'torch_cl' is the same script with "
            "the model and the images in channels_last (NHWC) memory format: not in the "
            "record's script, but oneDNN's faster layout for these convolutions on this CPU, "
            "so ours is also judged against the fastest PyTorch found.",
            "The CPU is shared with other work: medians of interleaved runs; see the load "
            "averages. PyTorch's OpenMP threads spin while they wait for each other, so a "
            "second busy process slows its steps several-fold (here: ~75 ms/step with one "
            "thread vs ~450 ms/step with its default two, while other work ran); its figures "
            "mean the most from a quiet machine.",
        ],
    }
    write_result_files(args.out, "speedrun", results, format_speedrun_markdown(results))
    return 0
