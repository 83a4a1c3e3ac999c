"""The names a user picks from: models, datasets, CNN implementations.

Each list lives here only, free of JAX, so that the command line and the config
can offer them as choices without importing JAX; :mod:`mnist_jax.models` and
:mod:`mnist_jax.data` build exactly these (their tests check it).
"""

from __future__ import annotations

MODELS = ("mlp", "cnn", "convnet", "smallcnn", "bncnn")
"""Built-in models of :func:`mnist_jax.models.create_model`."""

DATASETS = ("mnist", "fashion_mnist")
"""Datasets of :func:`mnist_jax.data.load_dataset`."""

IMPLS = ("auto", "fast", "xla")
"""Implementations of :class:`mnist_jax.models.CNN` (``impl``)."""
