"""Subprocess body of tests/test_parallel.py: train on a (forced) device set, save params.

    python tests/_parallel_worker.py OUT [--devices N[,M...]] [--train N] [--seeds 0,1]
        [--coordinator HOST:PORT --num-processes P --process-id I] [--epochs E] [--real]
        [--model SPEC [--model-args JSON]] [--augment SPEC]

Trains with :func:`mnist_jax.run.fit` on a deterministic synthetic dataset (or the
first ``--train`` real MNIST images when --real is given, from $MNIST_JAX_DATA_DIR)
and writes the final variables (params, and e.g. BatchNorm statistics of a
``--model file.py:Class`` of the user's) of each device count to ``OUT-<devices>.npz``
(process 0 only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def synthetic(n: int, seed: int = 0):
    from mnist_jax import data as data_lib
    rng = np.random.default_rng(seed)
    images, labels = data_lib.synthetic_digits(rng, n)
    labels = labels.astype(np.int32)
    images += rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)  # noisy: not learnt at once
    return data_lib.Dataset("synthetic", images[: n - 512], labels[: n - 512], images[n - 512:],
                            labels[n - 512:], source="test")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
    ap.add_argument("--train", type=int, default=128 * 300, help="training examples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--model-args")
    ap.add_argument("--augment", default="none")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--heartbeat-timeout", type=int, default=10)
    args = ap.parse_args()

    if args.coordinator:
        from mnist_jax import parallel
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        heartbeat_timeout=args.heartbeat_timeout,
                                        initialization_timeout=30)
    import jax

    from mnist_jax import data as data_lib
    from mnist_jax.config import TrainConfig
    from mnist_jax.run import fit

    if args.real:
        full = data_lib.load_dataset("mnist")
        ds = data_lib.Dataset("mnist-subset", full.train_images[: args.train],
                              full.train_labels[: args.train], full.test_images[:1000],
                              full.test_labels[:1000], source="subset")
    else:
        ds = synthetic(args.train + 512)
    def on_epoch(epoch, state, row):
        print(json.dumps({"epoch": epoch, "process": jax.process_index(), "t": time.time(),
                          "train_loss": row["train_loss"]}), flush=True)

    for devices in [int(d) for d in args.devices.split(",") if d] or [None]:
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                             hidden=(128,) if args.model == "mlp" else (),
                             model=args.model, model_args=args.model_args, augment=args.augment,
                             seeds=tuple(int(s) for s in args.seeds.split(",")),
                             devices=devices, checkpoint_every=0)
        result = fit(config, ds, on_epoch=on_epoch)
        n = jax.device_count() if devices is None else devices
        if jax.process_index() == 0:
            leaves = [np.asarray(x) for x in jax.tree.leaves(result.state.variables)]
            np.savez(f"{args.out}-{n}.npz", *leaves, processes=jax.process_count(),
                     history=json.dumps(result.history))
        print(json.dumps({"done": True, "process": jax.process_index(), "devices": n,
                          "train_sharding": str(result.data.train[0].sharding)
                          if hasattr(result.data.train[0], "sharding") else "host"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
