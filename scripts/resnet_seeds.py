"""A research script's own ResNet, trained over several seeds through the mnist-jax API.

The model below is written the way a user would write it: plain Flax linen, no
mnist-jax imports, BatchNorm in every residual block. ``mj.train_run`` trains all
seeds in ONE compiled program (their BatchNorm statistics kept per model) with the
script's own optax optimizer (AdamW under a warm-up + cosine schedule), and writes a
run folder: checkpoints, ``metrics.jsonl``, TensorBoard events, ``params.msgpack`` and
``results.json`` with every seed's test accuracy, their mean ± std and the accuracy of
their ensemble (mean of the seeds' softmax probabilities).

    MNIST_JAX_DATA_DIR=... python scripts/resnet_seeds.py --seeds 0,1,2 --epochs 4
    mnist-jax report runs/resnet-seeds    # the model is rebuilt from config.json

``--net record`` trains ``RecordResNet`` instead, the record-scale net of issue #13 (~4 h
per seed on a 2-core CPU: a job for a GPU, ``benchmarks/gpu_session.sh record-net``).

The run folder records this file as the model's source (``…/resnet_seeds.py:ResNet``),
so ``mnist-jax evaluate/predict/report`` rebuild the model as long as the file stays
where it is; importing it runs nothing but the definitions (``__main__`` guard).
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax


class Conv(nn.Module):
    """A square "SAME" convolution without bias, as shifted slices of the input
    concatenated along the channels (im2col) and one matrix product (``nn.Dense``, whose
    default initialiser is ``nn.Conv``'s: LeCun normal over k·k·C inputs).

    Written by hand before mnist-jax rewrote a module's ``nn.Conv`` into this form by
    itself on the CPU (``mnist_jax.convrewrite``): inside the compiled epoch's loop XLA's
    CPU convolutions are far slower than outside one (jax-ml/jax#12868), a matrix product
    is not. ``benchmarks/user_convs.py`` times this net against the same net with plain
    ``nn.Conv``. A stride keeps every ``stride``-th output (the patches are subsampled
    before the product).
    """

    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        k, (h, w) = self.kernel, x.shape[1:3]
        if k > 1:
            lo = (k - 1) // 2
            x = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
            x = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(k) for j in range(k)],
                                axis=-1)
        x = x[:, ::self.stride, ::self.stride]
        return nn.Dense(self.features, use_bias=self.use_bias)(x)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a strided 1×1 conv + BN where the shape
    changes), then ReLU: the basic block of He et al. (2016)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        def norm():
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)

        y = nn.relu(norm()(Conv(self.features, 3, self.stride)(x)))
        y = norm()(Conv(self.features, 3)(y))
        if x.shape[-1] != self.features or self.stride != 1:
            x = norm()(Conv(self.features, 1, self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet for 28×28 digits: a stride-2 stem (28→14), one residual block per
    stage at ``width``, 2×``width``, 4×``width`` channels (14→7→4), global average
    pooling, Dense 10.

    The stem is strided to keep it small enough for a 2-core CPU: at full 28×28
    resolution the same net trains ~5× slower.
    """

    width: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = x[..., None]  # (B, 28, 28) in [0, 1] -> NHWC
        x = Conv(self.width, 3, stride=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, mult in enumerate((1, 2, 4)):
            x = ResidualBlock(self.width * mult, stride=1 if i == 0 else 2)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def max_pool(x):
    """2×2 max-pooling, stride 2, a last odd row/column pooled alone (PyTorch's
    ``ceil_mode``), as a reshape + max: its gradient is a select, not XLA's
    select-and-scatter, which is slow on the CPU inside the compiled epoch."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).max(axis=(2, 4))


class NormedResidual(nn.Module):
    """BatchNorm, then that plus ReLU(conv 3×3) of it: ttdoucet/mnist's residual unit
    (the normalised input is the skip path)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return x + nn.relu(Conv(self.features, 3, use_bias=True)(x))


class RecordResNet(nn.Module):
    """The residual net behind ttdoucet/mnist's 99.70-99.79 % single-model test accuracy
    (10 runs of 10 epochs on a GPU; see that repository), written from its description:
    Conv 5×5 → 128 + ReLU at 28×28, residual unit, pool, residual unit; then per stage
    BatchNorm, Conv 3×3 → 256 / 512 + ReLU, pool, residual unit; BatchNorm, global average
    pooling, Dense 10. 329 M multiply-adds per digit, 33× the ``bncnn`` of the ``best``
    recipe. Inputs standardised with MNIST's mean and std."""

    widths: tuple[int, ...] = (128, 256, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = ((x - MNIST_MEAN) / MNIST_STD)[..., None]
        x = nn.relu(Conv(self.widths[0], 5, use_bias=True)(x))
        x = NormedResidual(self.widths[0])(x, train)
        x = NormedResidual(self.widths[0])(max_pool(x), train)
        for width in self.widths[1:]:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = max_pool(nn.relu(Conv(width, 3, use_bias=True)(x)))
            x = NormedResidual(width)(x, train)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


WARMUP = 0.1  # fraction of the run
WEIGHT_DECAY = 1e-4  # optax.adamw's default


def make_optimizer(lr: float, total_steps: int, warmup: float = WARMUP,
                   weight_decay: float = WEIGHT_DECAY) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to ``lr`` over ``warmup`` of the run, then cosine
    decay to 0."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, int(warmup * total_steps)), decay_steps=total_steps)
    return optax.adamw(schedule, weight_decay=weight_decay)


# Each net's defaults; the record net's are ttdoucet/mnist's (10 epochs, batch 100, a 30 %
# warm-up, peak step 4e-4) with the `best` recipe's augmentation, not tuned here.
NETS = {
    "resnet": {"epochs": 4, "batch_size": 128, "lr": 3e-3, "warmup": WARMUP,
               "augment": "none"},
    "record": {"epochs": 10, "batch_size": 100, "lr": 4e-4, "warmup": 0.3,
               "augment": "rotation=10,scale=0.1,shear=5,translate=2.5"},
}


def main(argv=None) -> int:
    # Imported here so that rebuilding the model from config.json imports only Flax.
    import mnist_jax as mj

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=tuple(NETS), default="resnet",
                   help="resnet: the small ResNet (default); record: RecordResNet, the "
                        "record-scale net (hours per epoch on a 2-core CPU; for a GPU)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, help="default: resnet 4, record 10")
    p.add_argument("--batch-size", type=int, help="default: resnet 128, record 100")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW "
                                             "(default: resnet 3e-3, record 4e-4)")
    p.add_argument("--warmup", type=float,
                   help="fraction of the run warming up (default: resnet 0.1, record 0.3)")
    p.add_argument("--width", type=int, default=16,
                   help="channels of the first stage of the resnet (default 16)")
    p.add_argument("--augment", help="on-device augmentation, e.g. rotation=10,translate=2 "
                                     "(default: resnet none, record the best recipe's)")
    p.add_argument("--validation-split", type=float, default=0.0,
                   help="fraction of the training digits held out for validation")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="save a checkpoint every N epochs (0: never; default 1)")
    p.add_argument("--out", help="run folder (default runs/NET-seeds)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST archives (default: $MNIST_JAX_DATA_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = p.parse_args(argv)
    for name, value in NETS[args.net].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = args.out or f"runs/{args.net}-seeds"

    t0 = time.perf_counter()
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        # optimizer/lr/schedule fields: only a description of the optimizer built below (an
        # optimizer passed to train_run is used as it is), so that config.json, the report's
        # per-model table and the resume check (a cosine run cannot grow) tell the truth.
        config = mj.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seeds=seeds,
                                data_dir=args.data_dir, augment=args.augment,
                                validation_split=args.validation_split,
                                checkpoint_every=args.checkpoint_every,
                                optimizer="adamw", learning_rates=(args.lr,),
                                weight_decay=WEIGHT_DECAY, lr_schedule="cosine",
                                warmup=args.warmup).validate()
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    except mj.MnistJaxError as e:
        p.error(str(e))
    model = ResNet(width=args.width) if args.net == "resnet" else RecordResNet()
    try:
        dataset = mj.load_dataset(config.dataset, config.data_dir)
        optimizer = make_optimizer(args.lr, config.total_steps(len(dataset.train_labels)),
                                   args.warmup, WEIGHT_DECAY)
        outcome = mj.train_run(config, args.out, model=model, optimizer=optimizer,
                               dataset=dataset, resume=args.resume, overwrite=args.overwrite)
    except mj.MnistJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    wall = time.perf_counter() - t0

    s, t = outcome.summary, outcome.timings
    n = config.num_models
    accs = np.atleast_1d(s["test_accuracy"])
    epoch_s = np.asarray(t["epoch_seconds"])
    params = mj.count_params(outcome.result.state.params) // n
    name = f"ResNet(width={args.width})" if args.net == "resnet" else "RecordResNet()"
    print(f"\n{name}, {params} parameters, AdamW (peak lr {args.lr:g}, "
          f"{args.warmup:g} warm-up + cosine), batch {args.batch_size}, augment "
          f"{args.augment}, {len(epoch_s)} epochs, {n} seed(s) in one program:")
    last = outcome.result.history[-1] if outcome.result.history else {}
    vals = np.atleast_1d(last.get("val_accuracy", [np.nan] * n))
    for seed, acc, val in zip(seeds, accs, vals):
        print(f"  seed {seed}: test accuracy {acc:.4f}"
              + (f", validation {val:.4f}" if np.isfinite(val) else ""))
    print(f"test accuracy {accs.mean():.4f} ± {accs.std():.4f} (mean ± std over {n} seeds), "
          f"min {accs.min():.4f}")
    if "ensemble_test_accuracy" in s:
        print(f"ensemble of the {n} seeds (mean of probabilities): "
              f"test accuracy {s['ensemble_test_accuracy']:.4f}")
    if len(epoch_s):
        print(f"time: {np.median(epoch_s):.1f} s per epoch for all {n} seeds "
              f"({np.median(epoch_s) / n:.1f} s per epoch per seed, median), compile "
              f"{t['compile_seconds']:.1f} s, train_run {t['total_seconds']:.1f} s, "
              f"script {wall:.1f} s")
    print(f"run folder: {outcome.run_dir}  (report: mnist-jax report {outcome.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
