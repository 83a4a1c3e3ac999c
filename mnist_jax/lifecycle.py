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
    from mnist_jax.run import build_model, device_description, plan_run

    t_start = time.perf_counter()
    config, model = _settle(config, model, optimizer)
    out = Path(out) if out is not None else default_run_dir(config)
    if parallel.is_primary():  # refusals first: nothing is loaded, written or deleted before
        _refuse(config, out, resume=resume, overwrite=overwrite)
    model = model if model is not None else build_model(config)  # a bad --model: exit 2 now
    if dataset is None:
        dataset = data_lib.load_dataset(config.dataset, config.data_dir)
    log(f"{dataset.name}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} "
        f"test images ({dataset.source}, {dataset.load_seconds:.2f} s)")
    plan = plan_run(config, dataset, loss, validate=False)
    fresh, fits = _fresh_state(plan, model, optimizer, log)
    run = (RunDir.for_training(out, resume=resume, overwrite=overwrite) if parallel.is_primary()
           else _FollowerRun(out))  # only process 0 writes the run folder
    recorder = _Recorder(run, config, progress)
    state, history = recorder.restore(fresh, resume, log)
    base = {"config": config.to_dict(), "device": device_description(),
            "memory": {k: fits[k] for k in ("needed_bytes", "available_bytes", "memory_source")}}
    result = recorder.fit(plan, base, model=model, optimizer=optimizer, state=state,
                          history=history)
    return _finish(run, result, fits, base, t_start)


def _settle(config: TrainConfig, model, optimizer) -> tuple[TrainConfig, Any]:
    """The validated config as ``config.json`` records it, and the model to train in
    linen's shape (None: the one the config names)."""
    config = config.validate()
    if model is not None:
        from mnist_jax.usermodel import as_model
        model = as_model(model, config.num_models)
    return _record_run(config, model, optimizer), model


def _refuse(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that holds a run (without ``resume``/``overwrite``), or a
    resumed run whose flags differ from the saved ones."""
    RunDir.check_for_training(out, resume=resume, overwrite=overwrite)
    if resume and (out / "config.json").is_file():
        check_resume_config(RunDir(out).read_config(), config)


def _fresh_state(plan, model, optimizer, log: Callable[[str], None]) -> tuple[Any, dict]:
    """The fresh state(s) and :func:`~mnist_jax.run.check_training_fits`'s figures.

    Batch size vs data and devices, memory: still before the run folder is touched (an
    ``--overwrite``'n run survives a refused one). The check compiles the epoch program fit
    runs, from the state's shapes, in a thread while this one makes the state (XLA
    compiles without the GIL: the two overlap on a CPU's cores).
    """
    from mnist_jax.run import StateInit, check_training_fits
    from mnist_jax.summary import summary as model_summary

    init = StateInit(plan.config, len(plan.dataset.train_labels), model=model,
                     optimizer=optimizer)
    with ThreadPoolExecutor(1, thread_name_prefix="mnist-jax-compile") as pool:
        fits = pool.submit(check_training_fits, plan, None, init.shapes())
        log(model_summary(model))
        fresh = init()
        return fresh, fits.result()


class _Recorder:
    """What happens around every epoch of a run: checkpoints, ``metrics.jsonl``, TensorBoard,
    the progress bar and a graceful Ctrl-C; and the run's ``results.json`` when training
    diverges, is interrupted or loses a process."""

    def __init__(self, run: RunDir, config: TrainConfig, progress: bool):
        from mnist_jax.checkpoint import Checkpointer

        self.run, self.config = run, config
        self.multi, primary = jax.process_count() > 1, parallel.is_primary()
        self.progress = progress and primary
        self.ckpt = (Checkpointer(run.checkpoint_dir, keep=config.keep_checkpoints,
                                  every=config.checkpoint_every)
                     if config.checkpoint_every and primary else None)
        self.tb: _Tensorboard | None = None
        self.rows: list[dict] = []
        self.last: dict[str, Any] = {}
        self.stop = _GracefulStop()

    def restore(self, fresh, resume: bool, log: Callable[[str], None]) -> tuple[Any, list]:
        """The state to start from (the newest complete checkpoint when resuming, on every
        process) and its history; the run folder's config and metrics written for it."""
        state, history = fresh, []
        if resume and self.ckpt is not None:
            restored = self.ckpt.restore(fresh)
            if restored is not None:
                epoch, state, meta = restored
                history = list(meta.get("history", []))[:epoch]
                log(f"resuming from the checkpoint of epoch {epoch}")
        if self.multi and resume:  # process 0's restored (or fresh) state, on every process
            from jax.experimental import multihost_utils
            state = multihost_utils.broadcast_one_to_all(state)
        self.run.write_config(self.config)
        self.run.write_metrics(history)
        self.rows = list(history)
        return state, history

    def meta(self) -> dict[str, Any]:
        return {"epoch": len(self.rows), "history": self.rows, "config": self.config.to_dict()}

    def on_epoch(self, epoch: int, state, row: dict) -> None:
        self.rows.append(row)
        self.last.update(epoch=epoch, state=state)
        if self.ckpt is not None:
            saved = jax.device_get(state) if self.multi else state  # process 0 alone writes
            self.ckpt.save(epoch, saved, self.meta())
        self.run.append_metrics(row)
        if self.tb is not None:
            self.tb.log(row)
        self.bar.update(epoch, row_text(row), row["epoch_seconds"])
        if self.stop.requested:  # Ctrl-C: this epoch is saved, stop here
            raise KeyboardInterrupt

    def fit(self, plan, base: dict[str, Any], **fit_args: Any):
        """:func:`mnist_jax.fit` of ``plan`` recording every epoch; the run's
        ``results.json`` says how it ended when it does not complete."""
        from mnist_jax.progress import EpochProgress
        from mnist_jax.run import TrainingDiverged, fit

        if parallel.is_primary():
            self.tb = _Tensorboard(self.run.path / "tb", self.config)
        self.bar = EpochProgress(self.config.epochs, initial=len(self.rows),
                                 disable=not self.progress)
        self.bar.set_compiling()
        try:
            with self.stop:
                return fit(plan, plan.dataset, on_epoch=self.on_epoch, **fit_args)
        except TrainingDiverged as e:
            self._ended(base, "diverged", error=str(e), epoch=e.epoch, step=e.step)
            raise
        except KeyboardInterrupt:
            self.bar.close()
            if self.ckpt is not None and self.last and self.ckpt.latest() != self.last["epoch"]:
                self.ckpt.save(self.last["epoch"], self.last["state"], self.meta(), force=True)
            self._ended(base, "interrupted")
            raise TrainingInterrupted(f"interrupted after epoch {len(self.rows)}; continue "
                                      "with --resume") from None
        except Exception as e:  # noqa: BLE001 - in a multi-process run: a peer died
            if not self.multi or isinstance(e, MnistJaxError):
                raise
            self._ended(base, "failed", error=f"lost another process: {e}"[:500])
            detail = next((line for line in str(e).splitlines() if line.strip()),
                          type(e).__name__)
            raise LostProcess(f"process {jax.process_index()} lost contact with the other "
                              f"processes after {len(self.rows)} complete epoch(s) "
                              f"({detail[:300]}); the last complete checkpoint is kept, "
                              "continue with --resume") from e
        finally:
            self.bar.close()
            if self.tb is not None:
                self.tb.close()
            if self.ckpt is not None:
                self.ckpt.close()

    def _ended(self, base: dict[str, Any], status: str, **details: Any) -> None:
        self.run.write_results(dict(base, status=status, **details,
                                    epochs_completed=len(self.rows)))


def _finish(run: RunDir, result, fits: dict, base: dict[str, Any],
            t_start: float) -> RunOutcome:
    """Write the trained variables and ``results.json``; the outcome with the first 30
    predicted test classes."""
    from mnist_jax.checkpoint import save_params
    from mnist_jax.run import predict, summarize_models
    from mnist_jax.training import unstack_state

    config = result.config
    if parallel.is_primary():
        save_params(run.params_path, jax.device_get(result.state.variables))
    summary = summarize_models(config, result.test)
    timings = dict(result.timings, total_seconds=time.perf_counter() - t_start)
    for key in ("compile_seconds", "train_compile_seconds"):  # compiled in check_training_fits
        timings[key] += fits["compile_seconds"]
    run.write_results(dict(base, status="completed", **summary, **timings,
                           epochs_completed=len(result.history)))
    first = result.state if config.num_models == 1 else unstack_state(result.state, 0)
    # one compiled batch of 30 (the 1,000-image default batch costs more than it serves)
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
    log floats. That import is a noticeable part of a short run's process, so torch is
    hidden from it (and only from it: a later ``import torch`` works as usual).
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
