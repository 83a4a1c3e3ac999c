"""Exported files against mnist-jax itself: sizes, and the time to classify the 10,000 test
digits with onnxruntime, with the StableHLO file in bare JAX, and with ``mj.predict``.

For each recipe (default: the tutorial's MLP, the Keras convnet, and ``best``'s BatchNorm
CNN as an ensemble of two seeds) it trains ``--epochs`` epochs on real MNIST (the weights do
not change the cost of a forward pass; the export check needs a trained run only to be
meaningful), exports both formats through :func:`mnist_jax.export` (which checks each file
on the 10,000 test digits), then times the three ways of computing the probabilities in
``--rounds`` interleaved rounds after one warm-up each, so that a busy shared machine slows
them alike. Reported: medians and the ratios to ``mj.predict`` in the same run.

Writes ``benchmarks/results/export-speed-<device>.json`` and ``.md``.

    MNIST_JAX_DATA_DIR=... python benchmarks/export_speed.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import mnist_jax as mj  # noqa: E402
from bench_harness import script_header  # noqa: E402
from mnist_jax.atomic import write_atomic  # noqa: E402

export_lib = importlib.import_module("mnist_jax.export")

RECIPES = {
    "tutorial": {},
    "keras-cnn": {},
    "best": {"seeds": (0, 1)},
}


def _train(recipe: str, epochs: int, ds, folder: Path) -> Path:
    config = mj.TrainConfig.from_recipe(recipe, epochs=epochs, **RECIPES[recipe])
    out = folder / recipe
    mj.train_run(config, out, dataset=ds, progress=False, log=lambda line: None)
    return out


def _timers(loaded, files: dict[str, Path], images: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """name → a function computing the (N, 10) probabilities of ``images`` once."""
    import jax
    import onnxruntime as ort

    states = [loaded.model_state(i) for i in range(loaded.config.num_models)]
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    hlo = jax.export.deserialize(bytearray(files["stablehlo"].read_bytes()))
    x = jax.numpy.asarray(images)
    return {
        "mj.predict": lambda: np.mean([mj.predict(s, images) for s in states], axis=0),
        "onnxruntime": lambda: session.run(None, {"images": images})[0],
        "stablehlo (bare jax)": lambda: np.asarray(hlo.call(x)),
    }


def _time(timers: dict, rounds: int) -> dict[str, list[float]]:
    for fn in timers.values():  # warm-up: compile, allocate
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, fn in timers.items():
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    return seconds


def measure(recipe: str, run_dir: Path, images: np.ndarray, rounds: int, folder: Path) -> dict:
    loaded = mj.load_run(run_dir)
    ensemble = loaded.config.num_models > 1
    files, export_s, checks = {}, {}, {}
    for fmt in ("onnx", "stablehlo"):
        t = time.perf_counter()
        done = export_lib.export(loaded, folder / f"{recipe}.{fmt}", format=fmt,
                                 ensemble=ensemble, log=lambda line: None)
        export_s[fmt] = time.perf_counter() - t
        files[fmt], checks[fmt] = done.path, done.check
    seconds = _time(_timers(loaded, files, images), rounds)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "recipe": recipe, "model": loaded.config.model, "models": loaded.config.num_models,
        "exported": "ensemble" if ensemble else "model 0",
        "bytes": {fmt: p.stat().st_size for fmt, p in files.items()},
        "params_bytes": (run_dir / "params.msgpack").stat().st_size,
        "export_seconds": export_s, "check": checks, "seconds": seconds,
        "median_seconds": med,
        "ratio_to_predict": {name: m / med["mj.predict"] for name, m in med.items()},
    }


def _cell(text: str) -> str:
    return text.replace("|", r"\|")  # a table cell: its own bars escaped


def markdown(result: dict) -> str:
    lines = [f"# Export: file sizes and 10,000-digit inference ({result['device']})", "",
             f"CPU: {result['cpu']} ({os.cpu_count()} cores); jax {result['jax']}, "
             f"onnxruntime {result['onnxruntime']}; {result['date']}; "
             f"`{result['command']}`.", "", result["note"], "",
             "| recipe (exported) | ONNX MB | StableHLO MB | mj.predict s | onnxruntime s "
             "(ratio) | StableHLO in bare JAX s (ratio) | check |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        m, q = r["median_seconds"], r["ratio_to_predict"]
        lines.append(
            f"| {r['recipe']} ({r['exported']}) | {r['bytes']['onnx'] / 1e6:.2f} | "
            f"{r['bytes']['stablehlo'] / 1e6:.2f} | {m['mj.predict']:.3f} | "
            f"{m['onnxruntime']:.3f} ({q['onnxruntime']:.2f}) | "
            f"{m['stablehlo (bare jax)']:.3f} ({q['stablehlo (bare jax)']:.2f}) | "
            f"{_cell(r['check']['onnx'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--note", default="", help="said in the results (e.g. other work on the "
                   "machine meanwhile)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import onnxruntime

    ds = mj.load_dataset("mnist")
    images = np.asarray(ds.test_images)
    result = dict(script_header("export_speed.py", argv), onnxruntime=onnxruntime.__version__,
                  note=args.note, runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for recipe in args.recipes.split(","):
            run_dir = _train(recipe, args.epochs, ds, folder)
            result["runs"].append(measure(recipe, run_dir, images, args.rounds, folder))
            print(json.dumps({k: result["runs"][-1][k] for k in
                              ("recipe", "bytes", "median_seconds", "ratio_to_predict")}))
    out = Path(args.out) / f"export-speed-{result['device']}"
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
