"""Shared fixtures: the real-data folders (from $MNIST_JAX_DATA_DIR) and a session MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnist_jax.data import DATA_DIR_ENV, Dataset, load_dataset


def _data_dir(name: str) -> Path:
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        pytest.skip(f"set {DATA_DIR_ENV} to the folder with the MNIST archives")
    root_path = Path(root)
    return root_path / name if (root_path / name).is_dir() else root_path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder with the official MNIST archives ($MNIST_JAX_DATA_DIR or its mnist/ subfolder)."""
    return _data_dir("mnist")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Folder with the Fashion-MNIST archives ($MNIST_JAX_DATA_DIR or its fashion_mnist/)."""
    return _data_dir("fashion_mnist")


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the whole session (tfds prepares MNIST into it once)."""
    return tmp_path_factory.mktemp("mnist_jax_cache")


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path, data_cache_dir: Path) -> Dataset:
    """Real MNIST, loaded once per session through ``load_dataset`` into a fresh cache."""
    return load_dataset("mnist", mnist_dir, cache_dir=data_cache_dir)


@pytest.fixture
def full_fp32_matmuls():
    """fp32 products at full precision: on a GPU the default lets both CNN paths use tf32
    matrix units (~1e-3 relative error), which would hide what fast-vs-xla checks."""
    import jax
    with jax.default_matmul_precision("highest"):
        yield
