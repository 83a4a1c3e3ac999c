"""The tutorial MLP over several seeds at once: mean ± std test accuracy, run folder, report.

Trains all seeds in ONE compiled program (``mnist-jax train --seeds ...``), then
writes the report (learning curves with the mean and the min–max band over the
seeds, confusion matrix and error grid of seed 0's model, report.md) and prints
the per-seed and mean ± std (population std) test accuracy.

    MNIST_JAX_DATA_DIR=... python scripts/seed_sweep.py --epochs 20 --out runs/mlp-8seeds
    python scripts/seed_sweep.py --out runs/mlp-8seeds --resume   # continue a killed sweep

Extra ``mnist-jax train`` flags go after ``--``, e.g. ``-- --hidden 256 --dropout 0.2``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_jax.cli import main as cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="runs/mlp-8seeds")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a sweep in --out")
    p.add_argument("--data-dir", default=None)
    p.add_argument("train_flags", nargs="*", help="more `mnist-jax train` flags (after --)")
    args = p.parse_args(argv)

    train = ["train", "--seeds", args.seeds, "--epochs", str(args.epochs), "--out", args.out,
             "--quiet", *args.train_flags]
    if args.data_dir:
        train += ["--data-dir", args.data_dir]
    if args.resume:
        train.append("--resume")
    if args.overwrite:
        train.append("--overwrite")
    code = cli(train)
    if code != 0:
        return code
    code = cli(["report", args.out] + (["--data-dir", args.data_dir] if args.data_dir else []))
    if code != 0:
        return code

    results = json.loads((Path(args.out) / "results.json").read_text())
    accs = results.get("per_model") or [{"seed": int(args.seeds), "lr": None,
                                         "test_accuracy": results["test_accuracy"]}]
    print(f"\n{len(accs)} seeds, {results['epochs_completed']} epochs "
          f"({results['config']['model']}, batch {results['config']['batch_size']}):")
    for m in accs:
        print(f"  seed {m['seed']}: test accuracy {m['test_accuracy']:.4f}")
    if "test_accuracy_mean" in results:
        print(f"test accuracy {results['test_accuracy_mean']:.4f} ± "
              f"{results['test_accuracy_std']:.4f} (mean ± std over {len(accs)} seeds); "
              f"test loss {results['test_loss_mean']:.4f} ± {results['test_loss_std']:.4f}")
    print(f"run folder {args.out}, report {Path(args.out) / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
