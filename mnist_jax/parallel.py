"""Data parallelism with JAX's own sharding: a 1-D ``data`` mesh over the devices.

Params and optimizer state are replicated; every global batch is split along the
``data`` axis. One jit-compiled program runs on all devices (no ``pmap``) and
XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mnist_jax.errors import UsageError

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
    """Put every array of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
