"""Would test-time augmentation or weight averaging help a finished run? Judged on the
run's validation split only, never on the test set (issue #13: the `best` recipe takes
"whatever else earns its place", test-time augmentation "only if it is also honest").

    MNIST_JAX_DATA_DIR=... python scripts/eval_variants.py runs/best

The run must have held out a validation split (``--validation-split``): these are the
last digits of the training set, which the run never trained on; the test set is not
read. For every model of the run, on those digits:

- test-time augmentation (TTA): the mean softmax over fixed transforms of each digit
  (shifts, rotations, zooms; drawn with the training augmentation's own warp) against
  the plain prediction;
- weight averaging: the mean of the kept checkpoints' weights and BatchNorm statistics
  (the statistics averaged, not recomputed) against each checkpoint alone.

Each line gives the models' accuracies, their mean, the errors summed over the models
and the accuracy of their ensemble (mean of the models' softmax probabilities).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import mnist_jax as mj
from mnist_jax.augment import affine_from_params, warp_affine
from mnist_jax.checkpoint import Checkpointer
from mnist_jax.config import CUSTOM

IDENTITY = (0.0, 1.0, 0.0, 0.0, 0.0)  # rotation°, zoom, shear°, shift down, shift right (px)
TTA = {
    "none": [IDENTITY],
    "shifts 1 px (4 + identity)": [(0, 1, 0, dy, dx) for dy, dx in
                                   ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))],
    "shifts 1 px (8 + identity)": [(0, 1, 0, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
    "shifts 0.5 px (4 + identity)": [(0, 1, 0, dy, dx) for dy, dx in
                                     ((0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5))],
    "rotations ±5°": [IDENTITY, (5, 1, 0, 0, 0), (-5, 1, 0, 0, 0)],
    "zooms ±5%": [IDENTITY, (0, 1.05, 0, 0, 0), (0, 0.95, 0, 0, 0)],
}


def score(probs: list[np.ndarray], labels: np.ndarray) -> str:
    """One line: per-model accuracies, their mean, errors summed, ensemble accuracy."""
    accs = [float((p.argmax(-1) == labels).mean()) for p in probs]
    errors = sum(int((p.argmax(-1) != labels).sum()) for p in probs)
    ensemble = float((np.mean(probs, 0).argmax(-1) == labels).mean())
    return (f"{' '.join(f'{a:.4f}' for a in accs)} | mean {np.mean(accs):.4f} | "
            f"errors {errors} | ensemble {ensemble:.4f}")


def tta_probs(state, images: np.ndarray, transforms: Sequence[tuple]) -> np.ndarray:
    """Mean softmax of one model over the transformed copies of ``images``."""
    pixels = jnp.asarray(images, jnp.float32)  # 0-255: predict scales by 1/255
    total = 0.0
    for t in transforms:
        view = pixels if t == IDENTITY else warp_affine(
            pixels, jnp.broadcast_to(affine_from_params(*t), (len(images), 2, 3)))
        total = total + mj.predict(state, view)
    return total / len(transforms)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run trained with --validation-split")
    parser.add_argument("--data-dir", help="the archives' folder (default: the run's, or "
                                           "$MNIST_JAX_DATA_DIR)")
    args = parser.parse_args(argv)
    try:
        loaded = mj.load_run(args.run_dir)
        if not loaded.config.validation_split:
            raise mj.UsageError(f"{args.run_dir} held out no validation split; without one "
                                "this would read the test set (train with --validation-split)")
        ds = mj.load_dataset(loaded.config.dataset, args.data_dir or loaded.config.data_dir)
        return report(loaded, ds)
    except mj.MnistJaxError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def report(loaded: mj.LoadedRun, ds: mj.Dataset) -> int:
    """Print both comparisons for a run and its dataset (validation digits only)."""
    config = loaded.config
    _, _, images, labels = mj.validation_split(ds.train_images, ds.train_labels,
                                               config.validation_split)
    labels = np.asarray(labels)
    models = range(config.num_models)
    print(f"{loaded.run.path}: {config.num_models} model(s), {len(labels)} validation digits")

    print("\ntest-time augmentation (final weights):")
    for name, transforms in TTA.items():
        probs = [tta_probs(loaded.model_state(i), images, transforms) for i in models]
        print(f"  {name:30s} {score(probs, labels)}", flush=True)

    print("\nweight averaging (kept checkpoints):")
    if config.optimizer == CUSTOM:  # its optimizer state's structure is not in config.json
        print("  the run trained with an optimizer of its own: its checkpoints need it")
        return 0
    template = mj.init_state(config, model=loaded.model)
    with Checkpointer(loaded.run.checkpoint_dir) as ckpt:
        kept = {e: ckpt.restore(template, epoch=e)[1] for e in ckpt.all_epochs()}
    if not kept:
        print("  no checkpoints kept")
        return 0
    epochs = sorted(kept)
    candidates = [(e,) for e in epochs] + [tuple(epochs[i:]) for i in range(len(epochs) - 1)]
    for group in candidates:
        mean = loaded.state.replace(**{
            part: jax.tree.map(lambda *a: sum(a) / len(a), *[getattr(kept[e], part) for e in group])
            for part in ("params", "model_state")})
        averaged = dataclasses.replace(loaded, state=mean)
        probs = [mj.predict(averaged.model_state(i), images) for i in models]
        label = "epoch " + "+".join(map(str, group))
        print(f"  {label:30s} {score(probs, labels)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
