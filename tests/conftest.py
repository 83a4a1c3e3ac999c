"""Shared fixtures: the real-data folders (from $MNIST_JAX_DATA_DIR), a session MNIST and
toy digits."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist_jax.data import (CACHE_DIR_ENV, DATA_DIR_ENV, Dataset, load_dataset,
                            synthetic_digits)


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


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder shared by the whole session (tfds prepares MNIST into it once). It is
    also ``$MNIST_JAX_CACHE_DIR`` for every run and subprocess that names no cache of its
    own, so no test prepares MNIST again elsewhere, and a user's own cache is never written."""
    path = tmp_path_factory.mktemp("mnist_jax_cache")
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path, data_cache_dir: Path) -> Dataset:
    """Real MNIST, loaded once per session through ``load_dataset`` into a fresh cache."""
    return load_dataset("mnist", mnist_dir, cache_dir=data_cache_dir)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """1,024 training and 256 test toy digits (``synthetic_digits``): a whole run through
    the library in seconds."""
    rng = np.random.default_rng(0)
    tx, ty = synthetic_digits(rng, 1024)
    vx, vy = synthetic_digits(rng, 256)
    return Dataset("mnist", tx, ty.astype(np.int32), vx, vy.astype(np.int32), "synthetic")


@pytest.fixture(scope="module")
def mnist_part(mnist, tmp_path_factory) -> Path:
    """The first 8,192 training and 2,000 test digits of MNIST as a folder of IDX files: the
    CLI's epoch learns from real digits in an eighth of the time (accuracy after a whole
    epoch is the API tests' business)."""
    from test_data import make_folder
    return make_folder(tmp_path_factory.mktemp("mnist_part"), gz=False,
                       train_images=mnist.train_images[:8192],
                       train_labels=mnist.train_labels[:8192],
                       test_images=mnist.test_images[:2000], test_labels=mnist.test_labels[:2000])


@pytest.fixture
def full_fp32_matmuls():
    """fp32 products at full precision: on a GPU the default lets both CNN paths use tf32
    matrix units (~1e-3 relative error), which would hide what fast-vs-xla checks."""
    import jax
    with jax.default_matmul_precision("highest"):
        yield


def pytest_configure(config: pytest.Config) -> None:
    _pin_worker_to_its_cpus()
    _share_compiled_programs(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_xla_cache_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _share_compiled_programs(config: pytest.Config) -> None:
    """XLA's persistent compilation cache (what ``mnist-jax`` uses) for this test process
    and every subprocess it starts, in a fresh folder of its own, removed at the end. Many
    tests compile the same programs again (a model's initialisation, its epoch) in new
    closures or new processes; reading them back cut test_fastconv, test_training and
    test_models from 434 to 374 s. Set here, before anything compiles: JAX decides once
    per process, at its first compilation, whether it uses the cache. A test that is
    about the cache itself removes ``JAX_COMPILATION_CACHE_DIR`` from its subprocesses."""
    import jax

    from mnist_jax.xla_cache import _MIN_COMPILE_SECONDS
    folder = tempfile.mkdtemp(prefix="mnist-jax-tests-xla-")
    config._xla_cache_dir = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(_MIN_COMPILE_SECONDS))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def _pin_worker_to_its_cpus() -> None:
    """Give each pytest-xdist worker its own share of the CPUs (with 2 workers on 2 cores,
    one core each). XLA's threads and the tests' subprocesses inherit the affinity, so the two
    workers never contend for one core: on the 2-core CPU the suite took 15 minutes instead
    of 21 serially, for the same CPU time (unpinned workers had cost ~20% more of it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not hasattr(os, "sched_setaffinity"):  # Linux only (not macOS or Windows)
        return
    cpus = sorted(os.sched_getaffinity(0))
    if worker and 1 < count <= len(cpus):
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % count::count])
