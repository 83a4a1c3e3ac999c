"""Data parallelism with JAX's own sharding: a 1-D ``data`` mesh over the devices.

Params, optimizer state and the model's collections (BatchNorm's ``batch_stats``) are
replicated; every global batch is split along the ``data`` axis. One jit-compiled
program runs on all devices (no ``pmap``) and XLA inserts the collectives: the
gradient all-reduce, and for BatchNorm the reductions of its batch mean and variance,
which are therefore statistics of the *global* batch, whatever the number of devices or
processes (what a single device computes, up to float summation order).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mnist_jax.errors import MnistJaxError, UsageError

DATA_AXIS = "data"


def make_data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if num_devices > len(devices):
        raise UsageError(f"invalid --devices {num_devices}: only {len(devices)} "
                         f"{devices[0].platform} device(s) available")
    if jax.process_count() > 1 and num_devices != len(devices):
        raise UsageError("--devices cannot restrict the device count in a multi-process run")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the mesh."""
    n = mesh.devices.size
    if batch_size % n:
        raise UsageError(f"invalid --batch-size {batch_size}: not divisible by the "
                         f"{n} devices it is split across (use --devices or another size)")


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array whose axis ``batch_axis`` is split over ``data``."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every array of ``tree`` on all devices of ``mesh``.

    With several processes every one must pass the same values (a global array).
    """
    if jax.process_count() > 1:
        return to_global(tree, replicated(mesh))
    return jax.device_put(tree, replicated(mesh))


# ---------------------------------------------------------------------------------------
# Several processes (hosts): jax.distributed, process-local batches
# ---------------------------------------------------------------------------------------
DEFAULT_HEARTBEAT_TIMEOUT = 60  # seconds without heartbeats before a process counts as dead


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *,
                           heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
                           initialization_timeout: int = 300) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` (call before any other JAX use).

    ``coordinator`` is process 0's ``HOST:PORT``; all three arguments may be None
    where JAX detects them (Cloud TPU, Slurm, Open MPI; ``JAX_COORDINATOR_ADDRESS``).
    On CPU the cross-process collectives use gloo. A process whose peers stop
    sending heartbeats for ``heartbeat_timeout`` seconds is terminated by JAX's
    coordination service (a collective on a dead peer fails at once), so a dead
    process never leaves the others hanging.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    bind = None
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise UsageError(f"invalid --coordinator {coordinator!r}: expected HOST:PORT")
        if host in ("127.0.0.1", "localhost", "[::1]"):
            bind = coordinator  # a local run listens on the loopback only
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"invalid --process-id {process_id}: must be in 0..{num_processes - 1}")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout,
                                   coordinator_bind_address=bind)
    except (ValueError, RuntimeError, TypeError) as e:
        raise DistributedError(f"cannot join the distributed run at {coordinator}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class DistributedError(MnistJaxError):
    """The processes of a multi-process run could not start or lost each other."""

    exit_code = 1


def is_primary() -> bool:
    """Process 0 — the one that writes the run folder in a multi-process run."""
    return jax.process_index() == 0


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Host-identical arrays of every process → one global array per leaf with ``sharding``.

    For a replicated sharding every process passes the full (identical) value.
    """
    def one(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.tree.map(one, tree)


def assert_same_on_all_processes(tree: Any, what: str) -> None:
    """Raise DistributedError unless ``tree`` (host values) is equal on every process."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    try:
        multihost_utils.assert_equal(tree, f"{what} differ between processes")
    except AssertionError as e:
        raise DistributedError(str(e).splitlines()[0]) from None


def _local_batch_slices(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> list[slice]:
    """This process's slices of ``axis`` under ``sharding``, in global order, distinct."""
    seen = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        s = index[axis]
        seen[(s.start or 0, shape[axis] if s.stop is None else s.stop)] = None
    return [slice(a, b) for a, b in sorted(seen)]


class ProcessLocalEpoch:
    """One training epoch when several processes share the mesh.

    Every process computes the same permutation (:func:`training.epoch_permutation`
    of the replicated state, so exactly the single-process shuffle), gathers on
    the host only the examples of *its* part of each global batch, and
    :func:`jax.make_array_from_process_local_data` assembles the global
    ``(steps, B, 28, 28)`` array sharded along the batch axis. The jit-compiled
    :func:`training.run_steps` then runs as one SPMD program over all processes.
    Called like the compiled single-process epoch: ``(state, images, labels)``,
    with the full training set as host arrays on every process.
    """

    def __init__(self, mesh: Mesh, batch_size: int, num_models: int = 1, options: Any = None):
        from mnist_jax import training
        options = options if options is not None else training.StepOptions()
        self.batch_size, self.num_models = batch_size, num_models
        self.axis = 1 if num_models == 1 else 2  # (steps, B, ...) or (models, steps, B, ...)
        self.sharding = batch_sharding(mesh, self.axis)
        perm = functools.partial(training.epoch_permutation, batch_size=batch_size)
        run = functools.partial(training.run_steps, batch_sharding=batch_sharding(mesh),
                                options=options)
        if num_models > 1:  # the same model axis as the single-process epoch
            axis = training.default_model_axis()
            perm = training.over_models(perm, 1, axis)
            one_run = run  # here the batches are per model too: map every argument
            run = (jax.vmap(one_run) if axis == "vmap" else
                   lambda s, x, y: jax.lax.map(lambda a: one_run(*a), (s, x, y)))
        self._perm = jax.jit(perm, static_argnums=1, out_shardings=replicated(mesh))
        self._run = jax.jit(run)

    def global_batches(self, state: Any, images: np.ndarray, labels: np.ndarray
                       ) -> tuple[jax.Array, jax.Array]:
        """The epoch's shuffled batches as global arrays, fed by each process's share."""
        perm = np.asarray(self._perm(state, images.shape[0]))  # replicated → identical everywhere
        shape = perm.shape
        local = np.concatenate([perm[..., s] for s in _local_batch_slices(
            self.sharding, shape, self.axis)], axis=-1)
        x = jax.make_array_from_process_local_data(self.sharding, images[local],
                                                   shape + images.shape[1:])
        y = jax.make_array_from_process_local_data(self.sharding, labels[local], shape)
        return x, y

    def compile(self, state: Any, images: np.ndarray, labels: np.ndarray) -> float:
        """Compile the steps for these shapes ahead of the first epoch; returns seconds."""
        t = time.perf_counter()
        x, y = self.global_batches(state, np.asarray(images), np.asarray(labels))
        self._compiled = self._run.lower(state, x, y).compile()
        return time.perf_counter() - t

    def __call__(self, state: Any, images: np.ndarray, labels: np.ndarray):
        x, y = self.global_batches(state, np.asarray(images), np.asarray(labels))
        return getattr(self, "_compiled", self._run)(state, x, y)
