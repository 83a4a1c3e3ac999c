"""Run by the data tests as a separate process: load a dataset, print one JSON line.

Usage: python tests/_data_load_worker.py NAME [DATA_DIR]   (cache: $MNIST_JAX_CACHE_DIR)
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from mnist_jax.data import load_dataset

FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def digest(ds) -> str:
    """One hash over the four arrays (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for field in FIELDS:
        array = np.ascontiguousarray(getattr(ds, field))
        h.update(f"{field}:{array.dtype}:{array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    ds = load_dataset(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps({"source": ds.source, "sha256": digest(ds),
                      "test_labels": ds.test_labels[:10].tolist(),
                      "train_labels": ds.train_labels[:10].tolist()}))
