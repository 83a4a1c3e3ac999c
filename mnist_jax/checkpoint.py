"""Crash-safe training checkpoints (orbax) and final-parameter files (msgpack).

Layout of a checkpoint directory (one sub-directory per saved epoch)::

    ckpts/epoch_3/state/...   train state: orbax OCDBT/zarr array store + JSON
    ckpts/epoch_3/meta/metadata   JSON: {"meta": <caller's dict>, "state_sha256": ...}

Nothing here uses pickle: orbax stores arrays with tensorstore and its own
bookkeeping as JSON; ``meta`` goes through ``json``; parameter files are
msgpack (flax.serialization), whose array records are plain dtype/shape/bytes.

Crash safety comes from orbax's commit protocol: a checkpoint is written into
``epoch_N.orbax-checkpoint-tmp`` and renamed to ``epoch_N`` only when complete
(nothing is written into ``epoch_N`` after that), and old checkpoints are
deleted only after that rename. Leftover
temporary directories are never listed and are removed by the next save.
Damage after the commit (truncated or missing files, bad JSON, flipped bits:
tensorstore has no checksums, so the arrays' SHA-256 is kept in the JSON) is
caught on restore, which then falls back to the previous checkpoint with a
warning.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from mnist_jax.atomic import fsync_dir, write_atomic
from mnist_jax.errors import DataError, UsageError, first_line

__all__ = ["Checkpointer", "save_params", "load_params"]

_STEP_PREFIX = "epoch"
_PARAMS_FORMAT = "mnist-jax-params"
_PARAMS_VERSION = 1


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of message``, shortened to ``limit`` characters."""
    first = first_line(exc).split(" See full TensorStore details")[0]
    msg = f"{type(exc).__name__}: {first}".rstrip(": ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _json_default(obj: Any) -> Any:
    """Turn numpy/JAX scalars and arrays into plain Python for ``json``."""
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint metadata: {type(obj).__name__} is not JSON-serializable")


def _digest(state: Any) -> str:
    """SHA-256 over the dtype, shape and bytes of every leaf, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _is_orbax_coroutine(obj: Any) -> bool:
    return inspect.iscoroutine(obj) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename


def _is_abandoned_io_noise(unraisable: Any) -> bool:
    """The two messages orbax's abandoned I/O prints (see ``_collect_abandoned_reads``)."""
    if _is_orbax_coroutine(unraisable.object):
        return True
    return unraisable.object is None and str(unraisable.exc_value) == "Event loop is closed"


def _collect_abandoned_reads() -> None:
    """Garbage-collect, quietly, the array reads a failed orbax restore abandoned.

    When one array of a damaged checkpoint fails, orbax closes its event loop
    while tensorstore still finishes the other reads; they then print
    "Exception ignored in: <coroutine ...>" (when collected) or "... Event
    loop is closed". The error that matters has been reported already, so
    collect what can be collected now without that noise. (Reads finishing
    later still print; that is orbax's, and harmless.)
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_io_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _abstract_leaf(x: Any) -> Any:
    """Restore target for one template leaf (keeps a jax.Array's sharding)."""
    if isinstance(x, np.generic):  # orbax rejects numpy scalars as targets
        x = np.asarray(x)
    return ocp.utils.to_shape_dtype_struct(x)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array-like or ``jax.ShapeDtypeStruct`` leaf."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    return tuple(x.shape), np.dtype(x.dtype)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, then ``root``'s parent."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
    fsync_dir(root.parent)




class Checkpointer:
    """Keeps the newest ``keep`` train-state checkpoints of a run, one per saved epoch.

    ``every``: ``save`` writes only epochs divisible by it (unless ``force``).
    Saving is synchronous: when ``save`` returns, the checkpoint is committed
    and fsync'ed. Use as a context manager or call ``close``.

    In a multi-process run only process 0 makes a Checkpointer and saves host
    copies of the (replicated) state: orbax is told that process 0 is the only
    active process, so it waits at no barrier for the others.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, every: int = 1) -> None:
        if keep < 1:
            raise UsageError(f"checkpoints to keep must be at least 1, got {keep}")
        if every < 1:
            raise UsageError(f"checkpoint interval must be at least 1 epoch, got {every}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.every = every
        self._known_good: set[int] = set()  # epochs this instance saved or restored
        multi = jax.process_count() > 1
        if multi:
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,  # orbax default is async
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            step_prefix=_STEP_PREFIX,
            create=not multi,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()})
            if multi else ocp.options.MultiprocessingOptions(),
            # Not at construction: a reader must never delete a live writer's
            # temporary directory. ``save`` cleans up instead.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # -- context manager -------------------------------------------------
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for outstanding work and release orbax resources."""
        self._manager.close()

    # -- queries ---------------------------------------------------------
    def step_dir(self, epoch: int) -> Path:
        """Directory holding the checkpoint of ``epoch``."""
        return self.directory / f"{_STEP_PREFIX}_{epoch}"

    def all_epochs(self) -> list[int]:
        """Epochs with a committed checkpoint, oldest first (re-read from disk)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        """Newest committed epoch whose metadata and array index are readable.

        This is a cheap check (it does not read the arrays); ``restore`` is the
        authoritative one and may still fall back further.
        """
        for epoch in reversed(self.all_epochs()):
            if self._looks_complete(epoch):
                return epoch
        return None

    def _looks_complete(self, epoch: int) -> bool:
        step = self.step_dir(epoch)
        try:
            record = json.loads((step / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(record, dict)
            and isinstance(record.get("meta"), dict)
            and (step / "state" / "_METADATA").is_file()
        )

    # -- save / restore --------------------------------------------------
    def save(self, epoch: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> None:
        """Checkpoint ``state`` and JSON ``meta`` as ``epoch`` (completed epochs).

        Skipped unless ``epoch % every == 0`` or ``force``, and when this
        instance already saved or restored ``epoch`` (e.g. a forced save on
        Ctrl-C right after the regular one: the good copy is never deleted to
        be rewritten). Other existing checkpoints of this or later epochs are
        stale (the run was resumed from an earlier one) and are deleted first.
        Older checkpoints beyond ``keep`` are
        deleted only after the new one is committed, so a failed save leaves
        them usable; its partial files are removed and the error propagates
        (tensorstore write failures, e.g. a full disk, as ``OSError``).
        """
        if not force and epoch % self.every != 0:
            return
        if epoch in self._known_good and epoch in self.all_epochs():
            return
        if not isinstance(meta, dict):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(meta).__name__}")
        record = {
            "meta": json.loads(json.dumps(meta, default=_json_default)),
            "state_sha256": _digest(state),
        }
        self._remove_temporary()
        for stale in self.all_epochs():
            if stale >= epoch:
                self._manager.delete(stale)
        try:
            self._manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(record),
                ),
                force=True,  # the ``every`` decision is ours
            )
        except BaseException as exc:
            self._remove_temporary()  # free the space a failed save used
            code = re.search(r"os_error_code='?(\d+)", str(exc))
            if code and not isinstance(exc, OSError):  # tensorstore I/O failure
                errno_ = int(code.group(1))
                raise OSError(
                    errno_, f"cannot write checkpoint {self.step_dir(epoch)}: {os.strerror(errno_)}"
                ) from exc
            raise
        _fsync_tree(self.step_dir(epoch))
        self._known_good.add(epoch)

    def _remove_temporary(self) -> None:
        """Delete temporary directories left by unfinished (e.g. killed) saves."""
        for tmp in ocp.path.step.all_temporary_paths(self.directory):
            shutil.rmtree(tmp.get(), ignore_errors=True)

    def restore(self, template_state: Any, epoch: int | None = None
                ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restore the newest usable checkpoint as ``(epoch, state, meta)``.

        ``template_state`` (arrays or ``jax.ShapeDtypeStruct`` leaves) gives
        the pytree structure, node types, dtypes and shardings of the result.
        A checkpoint that cannot be read is skipped with a warning naming it.
        Returns None when there are no checkpoints; raises DataError (naming
        the oldest one's problem, the others having been warned about) when
        there are some but none can be restored into the template.

        ``epoch`` restores that epoch's checkpoint instead, with the same checks
        and no fallback: DataError when it is not kept or cannot be read.
        """
        epochs = self.all_epochs()
        if epoch is not None:
            if epoch not in epochs:
                kept = ", ".join(map(str, epochs)) or "none"
                raise DataError(f"no checkpoint of epoch {epoch} in {self.directory} "
                                f"(kept: {kept})")
            epochs = [epoch]
        if not epochs:
            return None
        abstract = jax.tree.map(_abstract_leaf, template_state)
        problem = ""
        for epoch in reversed(epochs):
            try:
                restored = self._manager.restore(
                    epoch,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                record, state = restored["meta"], restored["state"]
                if not isinstance(record, dict) or not isinstance(record.get("meta"), dict):
                    raise ValueError("metadata is not a JSON object with a 'meta' object")
                if record.get("state_sha256") != _digest(state):
                    raise ValueError(
                        "arrays differ from the checksum taken when saved"
                        " (damaged data, or the template has other dtypes)"
                    )
                self._known_good.add(epoch)
                return epoch, state, record["meta"]
            except Exception as exc:  # damaged, partial or mismatched checkpoint
                problem = f"checkpoint {self.step_dir(epoch)} is unusable ({_one_line(exc)})"
                if epoch != epochs[0]:
                    warnings.warn(f"{problem}; falling back to an older checkpoint", stacklevel=2)
            _collect_abandoned_reads()  # after ``exc`` (and its frames) is released
        raise DataError(f"no usable checkpoint in {self.directory}: {problem}")


# -- final parameters -----------------------------------------------------
def save_params(path: str | Path, params: Any) -> None:
    """Write ``params`` (a pytree of arrays) to ``path`` atomically (msgpack)."""
    path = Path(path)
    state = serialization.to_state_dict(jax.device_get(params))
    payload = serialization.msgpack_serialize(
        {"format": _PARAMS_FORMAT, "version": _PARAMS_VERSION, "params": state}
    )
    write_atomic(path, payload)


def load_params(path: str | Path, template: Any = None) -> Any:
    """Read parameters written by ``save_params``.

    Without ``template`` the result is nested dicts of numpy arrays; with it,
    the result has the template's structure and node types, and any
    difference in structure, shape or dtype raises DataError.
    """
    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"parameter file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read parameter file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # msgpack raises assorted errors on bad bytes
        raise DataError(
            f"parameter file {path} is damaged or not a parameter file ({_one_line(exc)})"
        ) from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _PARAMS_FORMAT
        or not isinstance(payload.get("params"), dict)
    ):
        raise DataError(f"{path} is not a mnist-jax parameter file")
    if payload.get("version") != _PARAMS_VERSION:
        raise DataError(f"parameter file {path} has unsupported version {payload.get('version')!r}")
    params = payload["params"]
    if template is None:
        return params
    expected = serialization.to_state_dict(template)
    if jax.tree.structure(expected) != jax.tree.structure(params) or any(
        _shape_dtype(a) != _shape_dtype(b)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params))
    ):
        raise DataError(
            f"parameters in {path} don't match the model (different layers, shapes or dtypes)"
        )
    return serialization.from_state_dict(template, params)
