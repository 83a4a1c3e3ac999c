#!/usr/bin/env python
"""Reproduce the Keras MNIST tutorial's recipes with mnist-jax and print the figures.

    python scripts/reproduce_tutorial.py              # MLP: 100 epochs, batch 128, Adam
    python scripts/reproduce_tutorial.py --model cnn  # the Keras convnet: 12 epochs, batch 128
    python scripts/reproduce_tutorial.py --model cnn --lr-schedule cosine  # + cosine decay

Each recipe is an ordinary ``mnist-jax train`` run (written to ``runs/tutorial-MODEL``),
followed by ``mnist-jax report``; the script then prints the README's results row
from the run's ``results.json``. Needs MNIST_JAX_DATA_DIR (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from mnist_jax.cli import main as cli

RECIPES = {"mlp": ["--model", "mlp", "--epochs", "100", "--batch-size", "128"],
           "cnn": ["--model", "cnn", "--epochs", "12", "--batch-size", "128"]}


def run(model: str, out: Path, extra: list[str]) -> dict:
    code = cli(["train", *RECIPES[model], "--out", str(out), "--overwrite", *extra])
    if code:
        sys.exit(code)
    cli(["report", str(out)] + [a for a in extra if a.startswith("--data-dir")])
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*RECIPES, "both"], default="mlp")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--seed", default="0")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant: Keras' Adam as the tutorial uses it; cosine: decay to 0")
    p.add_argument("--data-dir")
    args = p.parse_args()
    extra = (["--seed", args.seed, "--lr-schedule", args.lr_schedule]
             + (["--data-dir", args.data_dir] if args.data_dir else []))
    suffix = "" if args.lr_schedule == "constant" else f"-{args.lr_schedule}"
    for model in RECIPES if args.model == "both" else [args.model]:
        r = run(model, args.runs / f"tutorial-{model}{suffix}", extra)
        secs = r["epoch_seconds"]
        print(f"| {model} | {r['config']['epochs']} | {r['test_loss']:.4f} | "
              f"{r['test_accuracy']:.4f} | {sum(secs):.1f} | {r['compile_seconds']:.1f} | "
              f"{r['total_seconds']:.1f} | {r['device']['platform']} ({platform.processor() or platform.machine()}) |")


if __name__ == "__main__":
    main()
