"""The CNN of Flax's NNX MNIST tutorial, trained through mnist-jax: several seeds in one program.

The net is written from the tutorial's description (Flax's ``docs_nnx/mnist_tutorial``),
in the version that has BatchNorm and Dropout and whose ``nnx.Dropout`` layers keep their
own ``rngs`` stream (the flax 0.11 / 0.12 pages)::

    Conv(1, 32, 3x3) -> Dropout(0.025) -> BatchNorm -> relu -> avg_pool 2x2
    Conv(32, 64, 3x3) -> BatchNorm -> relu -> avg_pool 2x2
    flatten (3136) -> Linear(3136, 256) -> Dropout(0.025) -> relu -> Linear(256, 10)

(The earliest tutorial had no BatchNorm and Dropout; the newest passes ``rngs`` to
``__call__`` instead of to the Dropout layers. mnist-jax calls a model as ``model(x)``
and keys every random stream from its train state, so the version used is the one whose
call takes the images alone.) The tutorial's optimizer, ``optax.adamw(0.005, 0.9)``
(learning rate 0.005, b1 "momentum" 0.9; optax's b2 0.999, eps 1e-8, weight decay 1e-4),
and its batch of 32, both written into the run's ``config.json``, so that ``--resume``,
``mnist-jax evaluate``, ``predict`` and ``report`` work on the run folder as on any other.

Every seed is one model of ONE compiled program per epoch (``mj.train_run`` with
``model=CNN``: one model per seed, each built as ``CNN(rngs=nnx.Rngs(key))`` from its
seed inside the program). Prints the test accuracy per seed and its mean ± std
(population std) after the last epoch, and leaves the run folder in ``--out``.

    MNIST_JAX_DATA_DIR=... python scripts/nnx_tutorial.py --seeds 0,1,2 --epochs 1 \\
        --out runs/nnx-tutorial

The same settings from the command line: ``mnist-jax train --model scripts/nnx_tutorial.py:CNN
--optimizer adamw --lr 0.005 --betas 0.9,0.999 --adam-eps 1e-8 --weight-decay 1e-4
--batch-size 32 --seeds 0,1,2 --epochs 1``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

import mnist_jax as mj  # noqa: E402

# The tutorial's training settings.
BATCH_SIZE = 32
LEARNING_RATE = 0.005
MOMENTUM = 0.9  # adamw's b1
ADAMW_EPS = 1e-8  # optax.adamw's defaults, which the tutorial keeps
ADAMW_WEIGHT_DECAY = 1e-4


class CNN(nnx.Module):
    """Flax's NNX tutorial CNN (see the module docstring), on images (B, 28, 28) or
    (B, 28, 28, 1) in [0, 1]; returns logits (B, 10). ``dropout``: the rate of both
    Dropout layers (the tutorial's 0.025)."""

    def __init__(self, dropout: float = 0.025, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=dropout, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=dropout, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = x[..., None] if x.ndim == 3 else x  # mnist-jax passes (B, 28, 28)
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x)))
        return self.linear2(x)


def tutorial_config(seeds: tuple[int, ...], epochs: int, data_dir: str | None = None,
                    batch_size: int = BATCH_SIZE) -> mj.TrainConfig:
    """The run's settings: the tutorial's adamw and batch, ``seeds`` in one program."""
    return mj.TrainConfig(epochs=epochs, batch_size=batch_size, seeds=seeds,
                          optimizer="adamw", learning_rates=(LEARNING_RATE,),
                          betas=(MOMENTUM, 0.999), adam_eps=ADAMW_EPS,
                          weight_decay=ADAMW_WEIGHT_DECAY, data_dir=data_dir)


def train(config: mj.TrainConfig, out: str | Path, *, resume: bool = False,
          overwrite: bool = False, dataset: mj.Dataset | None = None,
          progress: bool = True) -> mj.RunOutcome:
    """Train the tutorial CNN as ``config`` says into the run folder ``out``."""
    return mj.train_run(config, out, model=CNN, resume=resume, overwrite=overwrite,
                        dataset=dataset, progress=progress)


def accuracy_lines(outcome: mj.RunOutcome) -> list[str]:
    """Per-seed test accuracy and, for several seeds, their mean ± std (population)."""
    s, config = outcome.summary, outcome.result.config
    epochs = len(outcome.result.history)
    if config.num_models == 1:
        return [f"seed {config.seeds[0]}: test accuracy {s['test_accuracy']:.4f} "
                f"after {epochs} epoch(s)"]
    lines = [f"  seed {m['seed']}: test accuracy {m['test_accuracy']:.4f}"
             for m in s["per_model"]]
    lines.append(f"test accuracy {s['test_accuracy_mean']:.4f} ± {s['test_accuracy_std']:.4f} "
                 f"(mean ± std over {config.num_models} seeds, epoch {epochs}); "
                 f"ensemble {s['ensemble_test_accuracy']:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=1, help="epochs (default 1)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"batch size (default {BATCH_SIZE}, the tutorial's)")
    p.add_argument("--out", default="runs/nnx-tutorial", help="run folder")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST archives (default: $MNIST_JAX_DATA_DIR)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    args = p.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    try:
        config = tutorial_config(seeds, args.epochs, args.data_dir, args.batch_size)
        outcome = train(config, args.out, resume=args.resume, overwrite=args.overwrite)
    except mj.MnistJaxError as e:
        print(f"nnx_tutorial.py: {e}", file=sys.stderr)
        return e.exit_code
    t = outcome.timings
    print("\n".join(accuracy_lines(outcome)))
    print(f"training {sum(t['epoch_seconds']):.1f} s over {len(t['epoch_seconds'])} epoch(s) "
          f"(compiling {t['compile_seconds']:.1f} s, whole run {t['total_seconds']:.1f} s); "
          f"run folder {outcome.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
