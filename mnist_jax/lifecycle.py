"""A training run with everything around it, as library calls: :func:`train_run` and
:func:`load_run`.

:func:`train_run` is what ``mnist-jax train`` does, for a research script too: refuse a
run that cannot start (before anything is written), load the data, build or restore the
state, train through :func:`mnist_jax.run.fit` with checkpoints, ``metrics.jsonl``,
TensorBoard events and progress after every epoch, stop cleanly on Ctrl-C, and write
``params.msgpack`` and ``results.json``. In a multi-process run process 0 alone writes.
:func:`load_run` reads a finished run back (its model rebuilt from ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mnist_jax import data as data_lib
from mnist_jax import parallel
from mnist_jax.config import CUSTOM, TrainConfig
from mnist_jax.errors import MnistJaxError, UsageError
from mnist_jax.rundir import CURVE_SUFFIX, RunDir

__all__ = ["LoadedRun", "RunOutcome", "TrainingInterrupted", "LostProcess", "train_run",
           "load_run", "default_run_dir", "check_resume_config"]


class TrainingInterrupted(MnistJaxError):
    """Ctrl-C: the epochs completed so far are saved; ``--resume`` continues."""

    exit_code = 130


class LostProcess(MnistJaxError):
    """A multi-process run lost another process; the last complete checkpoint is kept."""

    exit_code = 1


@dataclasses.dataclass
class RunOutcome:
    """What :func:`train_run` returns: the run folder, :func:`fit`'s result, the figures
    written to ``results.json`` and the first 30 predicted test classes (first model)."""

    run_dir: Path
    result: Any  # mnist_jax.run.FitResult
    summary: dict[str, Any]
    timings: dict[str, Any]
    first_classes: np.ndarray


@dataclasses.dataclass
class LoadedRun:
    """A finished run read back: its folder, config, model and a state holding the
    trained variables (stacked over models when it trained several)."""

    run: RunDir
    config: TrainConfig
    model: Any
    state: Any

    def model_state(self, i: int = 0):
        """Model ``i``'s state (the state itself when the run trained one model)."""
        from mnist_jax.training import unstack_state
        return self.state if self.config.num_models == 1 else unstack_state(self.state, i)


def default_run_dir(config: TrainConfig) -> Path:
    from mnist_jax.run import model_name
    return Path(f"runs/{model_name(config)}-{config.dataset}")


def check_resume_config(saved: TrainConfig, config: TrainConfig) -> None:
    """A resumed run must train the same thing; only the epoch count may grow (unless a
    scheduled learning rate, which spans the planned epochs, is used)."""
    a, b = saved.to_dict(), config.to_dict()
    for d in (a, b):  # the same JSON object, however spaced or ordered
        d["model_args"] = json.loads(d["model_args"] or "{}")
    ignore = {"epochs", "data_dir", "checkpoint_every", "keep_checkpoints", "devices", "recipe"}
    if b.get("lr_schedule", "constant") != "constant":  # the schedule spans the whole run
        ignore.discard("epochs")
    diff = [k for k in a if k not in ignore and a.get(k) != b.get(k)]
    if diff:
        raise UsageError(f"--resume: the flags differ from the saved run in {', '.join(diff)} "
                         f"(saved: {', '.join(f'{k}={a[k]}' for k in diff)})")


def _record_run(config: TrainConfig, model, optimizer) -> TrainConfig:
    """``config`` as ``config.json`` records it: ``model``/``model_args`` saying where a
    user's module comes from, ``optimizer="custom"`` for an optax optimizer of the user's
    (whose settings ``config`` cannot hold)."""
    if optimizer is not None:
        config = dataclasses.replace(config, optimizer=CUSTOM)
    if model is None:
        if not config.is_builtin_model:
            from mnist_jax.usermodel import normalize_spec
            return dataclasses.replace(config, model=normalize_spec(config.model))
        return config
    from mnist_jax.usermodel import describe
    spec, args = describe(model)
    return dataclasses.replace(config, model=spec, model_args=args)


def train_run(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
              overwrite: bool = False, model=None, optimizer=None, loss: Callable | None = None,
              dataset: data_lib.Dataset | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> RunOutcome:
    """Train ``config`` into the run folder ``out`` (default ``runs/MODEL-DATASET``).

    ``model``/``optimizer``/``loss`` as in :func:`mnist_jax.fit` (a user's ``model`` is
    recorded in ``config.json`` as ``module:Class`` plus its fields, so that
    :func:`load_run` can rebuild it where that module imports). ``resume`` continues
    from the newest complete checkpoint (the same ``optimizer`` must be given again);
    ``overwrite`` replaces a run already there; without either, an existing run is
    refused. ``log`` receives the lines a terminal shows; ``progress`` shows a bar (one
    line per epoch when stderr is not a terminal). Raises :class:`UsageError` /
    :class:`~mnist_jax.errors.DataError` before writing anything for a run that cannot
    start, :class:`mnist_jax.run.TrainingDiverged` on a non-finite loss,
    :class:`TrainingInterrupted` after a Ctrl-C (the completed epochs saved).
    """
    from mnist_jax.summary import summary as model_summary
    from mnist_jax.checkpoint import Checkpointer, save_params
    from mnist_jax.progress import EpochProgress
    from mnist_jax.run import (StateInit, TrainingDiverged, build_model, check_training_fits,
                               device_description, fit, predict, step_options,
                               summarize_models)
    from mnist_jax.training import unstack_state

    t_start = time.perf_counter()
    multi = jax.process_count() > 1
    primary = parallel.is_primary()
    config = config.validate()
    if model is not None:
        from mnist_jax.usermodel import as_model
        model = as_model(model, config.num_models)
    config = _record_run(config, model, optimizer)
    out = Path(out) if out is not None else default_run_dir(config)
    if primary:  # refusals first: nothing is loaded, written or deleted before them
        RunDir.check_for_training(out, resume=resume, overwrite=overwrite)
        if resume and (out / "config.json").is_file():
            check_resume_config(RunDir(out).read_config(), config)

    model = model if model is not None else build_model(config)  # a bad --model: exit 2 now
    if dataset is None:
        dataset = data_lib.load_dataset(config.dataset, config.data_dir)
    log(f"{dataset.name}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} "
        f"test images ({dataset.source}, {dataset.load_seconds:.2f} s)")
    init = StateInit(config, len(dataset.train_labels), model=model, optimizer=optimizer)
    options = step_options(config, loss)
    # Batch size vs data and devices, memory: still before the run folder is touched
    # (an --overwrite'n run survives a refused one); compiles the epoch program fit runs,
    # from the state's shapes, in a thread while this one makes the state (XLA compiles
    # without the GIL: the two overlap on a CPU's cores).
    with ThreadPoolExecutor(1, thread_name_prefix="mnist-jax-compile") as pool:
        fits = pool.submit(check_training_fits, config, dataset, init.shapes(), options)
        log(model_summary(model))
        fresh = init()
        fits = fits.result()
    run = (RunDir.for_training(out, resume=resume, overwrite=overwrite) if primary
           else _FollowerRun(out))  # only process 0 writes the run folder

    ckpt = (Checkpointer(run.checkpoint_dir, keep=config.keep_checkpoints,
                         every=config.checkpoint_every)
            if config.checkpoint_every and primary else None)
    state, history = fresh, []
    if resume and ckpt is not None:
        restored = ckpt.restore(fresh)
        if restored is not None:
            epoch, state, meta = restored
            history = list(meta.get("history", []))[:epoch]
            log(f"resuming from the checkpoint of epoch {epoch}")
    if multi and resume:  # process 0's restored (or fresh) state, on every process
        from jax.experimental import multihost_utils
        state = multihost_utils.broadcast_one_to_all(state)
    run.write_config(config)
    run.write_metrics(history)
    tb = _Tensorboard(run.path / "tb", config) if primary else None

    rows = list(history)
    last: dict[str, Any] = {}
    bar = EpochProgress(config.epochs, initial=len(history), disable=not (progress and primary))
    bar.set_compiling()
    stop = _GracefulStop()

    def meta() -> dict[str, Any]:
        return {"epoch": len(rows), "history": rows, "config": config.to_dict()}

    def on_epoch(epoch: int, state, row: dict) -> None:
        rows.append(row)
        last.update(epoch=epoch, state=state)
        if ckpt is not None:
            saved = jax.device_get(state) if multi else state  # host copy: process 0 alone writes
            ckpt.save(epoch, saved, meta())
        run.append_metrics(row)
        if tb is not None:
            tb.log(row)
        bar.update(epoch, row_text(row), row["epoch_seconds"])
        if stop.requested:  # Ctrl-C: this epoch is saved, stop here
            raise KeyboardInterrupt

    base = {"config": config.to_dict(), "device": device_description(),
            "memory": {k: fits[k] for k in ("needed_bytes", "available_bytes", "memory_source")}}
    try:
        with stop:
            result = fit(config, dataset, model=model, optimizer=optimizer, loss=loss,
                         state=state, history=history, on_epoch=on_epoch)
    except TrainingDiverged as e:
        run.write_results(dict(base, status="diverged", error=str(e), epoch=e.epoch, step=e.step,
                               epochs_completed=len(rows)))
        raise
    except KeyboardInterrupt:
        bar.close()
        if ckpt is not None and last and ckpt.latest() != last["epoch"]:
            ckpt.save(last["epoch"], last["state"], meta(), force=True)
        run.write_results(dict(base, status="interrupted", epochs_completed=len(rows)))
        raise TrainingInterrupted(f"interrupted after epoch {len(rows)}; continue with "
                                  "--resume") from None
    except Exception as e:  # noqa: BLE001 - in a multi-process run: a peer died
        if not multi or isinstance(e, MnistJaxError):
            raise
        run.write_results(dict(base, status="failed", error=f"lost another process: {e}"[:500],
                               epochs_completed=len(rows)))
        detail = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LostProcess(f"process {jax.process_index()} lost contact with the other "
                          f"processes after {len(rows)} complete epoch(s) ({detail[:300]}); "
                          "the last complete checkpoint is kept, continue with --resume") from e
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        if ckpt is not None:
            ckpt.close()

    if primary:
        save_params(run.params_path, jax.device_get(result.state.variables))
    summary = summarize_models(config, result.test)
    timings = dict(result.timings, total_seconds=time.perf_counter() - t_start)
    for key in ("compile_seconds", "train_compile_seconds"):  # compiled in check_training_fits
        timings[key] += fits["compile_seconds"]
    run.write_results(dict(base, status="completed", **summary, **timings,
                           epochs_completed=len(result.history)))
    first = result.state if config.num_models == 1 else unstack_state(result.state, 0)
    # one compiled batch of 30 (op by op, the 1,000-image default batch took 0.8 s)
    classes = predict(first, np.asarray(result.data.test[0][:30]), batch_size=30).argmax(-1)
    return RunOutcome(run.path, result, summary, timings, classes)


def load_run(run_dir: str | Path, *, model=None) -> LoadedRun:
    """A finished run: its config, its model (rebuilt from ``config.json``, or ``model``
    when given) and a state holding its trained variables (``params`` and any
    collections such as ``batch_stats``), stacked over models when it trained several.
    The state has no optimizer: it serves ``evaluate``/``predict``/``report``."""
    from mnist_jax.checkpoint import load_params
    from mnist_jax.run import build_model
    from mnist_jax.training import TrainState

    run = RunDir.open(run_dir)
    config = run.read_config()
    if not run.params_path.exists():
        raise UsageError(f"{run.path} has no trained parameters (params.msgpack): "
                         "the run did not finish; continue it with train --resume")
    if model is not None:
        from mnist_jax.usermodel import as_model
        model = as_model(model)
    else:
        model = build_model(config)
    # The variables' structure without running the initialisers (eagerly they take seconds).
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jax.numpy.zeros((1, 28, 28)), train=False))
    if config.num_models > 1:
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((config.num_models, *s.shape),
                                                             s.dtype), shapes)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables = dict(load_params(run.params_path, template))
    params = variables.pop("params")
    steps = np.zeros((config.num_models,) if config.num_models > 1 else (), np.int32)
    state = TrainState(step=steps, apply_fn=model.apply, params=params, tx=None,
                       opt_state=None, rng=None, model_state=variables)
    return LoadedRun(run, config, model, state)


def row_text(row: dict) -> str:
    """One epoch's figures as a short line (means over models)."""
    def fmt(v):
        return f"{np.mean(v):.4f}"
    parts = [f"loss {fmt(row['train_loss'])}", f"acc {fmt(row['train_accuracy'])}"]
    if "val_accuracy" in row:
        parts.append(f"val_acc {fmt(row['val_accuracy'])}")
    if "test_accuracy" in row:  # with a validation split: the last epoch only
        parts.append(f"test_acc {fmt(row['test_accuracy'])}")
    return ", ".join(parts)


class _FollowerRun(RunDir):
    """The run folder as processes other than 0 see it: readable, never written."""

    def _skip(self, *args: Any, **kwargs: Any) -> None:
        return None

    write_config = write_metrics = append_metrics = write_results = _skip


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors; we
    log floats. That import is 1.5 s of a 20 s speedrun process on the 2-core CPU, so torch
    is hidden from it (and only from it: a later ``import torch`` works as usual).
    """
    if "torch" in sys.modules:  # the user's process has it already: nothing to save
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class _Tensorboard:
    """Every metric of every epoch as TensorBoard scalars (one tag prefix per model)."""

    def __init__(self, path: Path, config: TrainConfig):
        self.writer = _summary_writer_class()(str(path))
        self.names = ([""] if config.num_models == 1 else
                      [f"seed{m['seed']}_lr{m['lr']:g}/" for m in config.model_grid()])

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key in ("epoch", "models") or key.endswith(CURVE_SUFFIX):  # the report draws those
                continue
            values = value if isinstance(value, list) else [value]
            for name, v in zip(self.names, values):
                self.writer.add_scalar(f"{name}{key}", v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _GracefulStop:
    """While training, the first SIGINT (Ctrl-C) asks to stop once the epoch in progress is
    complete and saved (``requested``); a second one interrupts at once.

    A KeyboardInterrupt raised in the middle of a checkpoint save or a metrics write would
    leave them half done; the compiled epoch cannot be interrupted anyway (the signal waits
    until it returns), so waiting for its end costs nothing.
    """

    requested = False

    def __enter__(self) -> "_GracefulStop":
        self._previous = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        import sys
        print("mnist-jax: stopping after the epoch in progress is saved (Ctrl-C again to stop "
              "at once)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
