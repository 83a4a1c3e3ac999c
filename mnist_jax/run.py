"""A training run on the host: data → device → compiled epochs → metrics.

:func:`fit` is the whole run as a function of a :class:`~mnist_jax.config.TrainConfig`;
it prints nothing and writes nothing. What happens after each epoch (progress,
logs, checkpoints) is the caller's ``on_epoch`` callback — the CLI's run
directory, or nothing at all in the API.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import data as data_lib
from mnist_jax import convrewrite, models, parallel
from mnist_jax.config import CUSTOM, TrainConfig
from mnist_jax.errors import MnistJaxError, UsageError, first_line
from mnist_jax.rundir import CURVE_SUFFIX
from mnist_jax.augment import AugmentSpec
from mnist_jax.usermodel import as_model
from mnist_jax.training import (CompiledFns, CrossEntropy, StepOptions, TrainState, compile_fns,
                                CPU_LIBRARY_FUSIONS, CPU_LOOP_EMITTERS, create_train_state,
                                exposes_learning_rate, loop_emitter_options,
                                make_optimizer, stack_states, to_host)


class TrainingDiverged(MnistJaxError):
    """The loss became NaN or infinite; ``state`` is the last good one."""

    exit_code = 1

    def __init__(self, epoch: int, step: int, state: TrainState):
        super().__init__(f"training diverged: non-finite loss at epoch {epoch}, "
                         f"step {step} (global step {state_step(state) + step})")
        self.epoch, self.step, self.state = epoch, step, state


@dataclasses.dataclass
class DeviceData:
    """The splits of a dataset as device arrays (uint8 images, int32 labels)."""

    train: tuple[jax.Array, jax.Array]
    test: tuple[jax.Array, jax.Array]
    val: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final state, per-epoch history and timings.

    ``state`` has a leading model axis when the config trains several models.
    """

    config: TrainConfig
    state: TrainState
    history: list[dict[str, Any]]
    test: dict[str, Any]
    timings: dict[str, Any]
    fns: CompiledFns
    data: DeviceData


def state_step(state: TrainState) -> int:
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def build_model(config: TrainConfig):
    """The Flax module that ``config`` describes: a preset, or the user's module (linen,
    or NNX through :class:`~mnist_jax.nnxmodel.NNXModel`) that ``config.model`` names
    (``file.py:Class`` / ``package.module:Class``)."""
    if not config.is_builtin_model:
        from mnist_jax.usermodel import build_user_model
        return build_user_model(config.model, config.model_args)

    def bad(e: Exception) -> UsageError:
        return UsageError(f"invalid --model-args {config.model_args!r} for {config.model}: "
                          f"{first_line(e)}")

    try:
        model = models.create_model(config.model, **config.model_kwargs())
    except (TypeError, ValueError) as e:  # a field the preset lacks, or a bad value
        raise bad(e) from None
    if config.model_args:  # the presets trace with their own fields; trace the user's once
        try:
            for train in (True, False):
                jax.eval_shape(functools.partial(model.init, train=train),
                               {"params": jax.random.key(0), "dropout": jax.random.key(0)},
                               jnp.zeros((1, *data_lib.IMAGE_SHAPE)))
        except Exception as e:  # noqa: BLE001 - e.g. no conv layer, kernel 0, an odd padding
            raise bad(e) from None
    return model


def build_optimizer(config: TrainConfig, train_examples: int = data_lib.TRAIN_EXAMPLES):
    """The optax optimizer that ``config`` describes (its first learning rate; a sweep
    sets each model's own in its state). ``train_examples`` (before the validation
    split) sets the length of a scheduled run."""
    if config.optimizer == CUSTOM:
        raise UsageError("this run was trained with an optax optimizer of the user's: pass it "
                         "again (optimizer=...) to continue it")
    # (at least 1 step: a batch larger than the data is refused later, with its own message)
    return make_optimizer(config.learning_rates[0], config.adam_eps, config.lr_schedule,
                          max(1, config.total_steps(train_examples)), name=config.optimizer,
                          betas=tuple(config.betas), weight_decay=config.weight_decay,
                          momentum=config.momentum, warmup=config.warmup)


def step_options(config: TrainConfig, loss: Callable | None = None) -> StepOptions:
    """The loss, augmentation and convolutions (``config.impl``: "auto" rewrites a model's
    convolutions into the fast CPU form on the CPU) of ``config``'s training step (``loss``
    overrides the cross-entropy)."""
    spec = AugmentSpec.parse(config.augment)
    return StepOptions(loss=loss if loss is not None else CrossEntropy(config.label_smoothing),
                       augment=spec if spec.enabled else None, convs=config.impl)


class StateInit:
    """How the fresh train state(s) of ``config`` are made: their shapes at once
    (:meth:`shapes`, nothing computed), the arrays when called. One per run, so that
    the shapes and the arrays share one model and one optimizer object: a program
    compiled for the shapes then runs the arrays. Arguments as :func:`init_state`.
    """

    def __init__(self, config: TrainConfig, train_examples: int = data_lib.TRAIN_EXAMPLES, *,
                 model=None, optimizer=None):
        model = as_model(model, config.num_models) if model is not None else build_model(config)
        tx = optimizer if optimizer is not None else build_optimizer(config, train_examples)
        set_lr = optimizer is None or len(config.learning_rates) > 1
        if optimizer is not None and set_lr and not exposes_learning_rate(optimizer):
            raise UsageError("--lr sweep: the optimizer does not expose its learning rate; "
                             "build it with optax.inject_hyperparams(...)(learning_rate=...)")
        # Seed and rate are traced, so every model of a sweep reuses one program.
        self._grid = [(np.int32(m["seed"]), np.float32(m["lr"])) for m in config.model_grid()]
        self._create = jax.jit(
            lambda seed, lr: create_train_state(model, tx, seed, lr if set_lr else None))

    def shapes(self) -> TrainState:
        """The state's structure with ``jax.ShapeDtypeStruct`` leaves (stacked when several)."""
        return jax.eval_shape(lambda: self._made(self._create))

    def __call__(self) -> TrainState:
        # One compiled program, not op by op: eager initialisation dispatches hundreds of
        # small ops, seconds of them on a CPU. Every leaf comes out a device array
        # (step: int32).
        return self._made(self._create.lower(*self._grid[0]).compile(
            compiler_options=_init_compile_options()))

    def _made(self, create: Callable) -> TrainState:
        """One state per (seed, rate) from ``create``, stacked when several."""
        states = [create(seed, lr) for seed, lr in self._grid]
        return states[0] if len(states) == 1 else stack_states(states)


def init_state(config: TrainConfig, train_examples: int = data_lib.TRAIN_EXAMPLES, *,
               model=None, optimizer=None) -> TrainState:
    """Fresh train state(s): one per (seed, learning rate), stacked when several.

    ``model`` (a Flax linen module, or an NNX class, callable or instance: see
    :func:`fit`) and ``optimizer`` (any ``optax.GradientTransformation``) replace the ones
    ``config`` describes. With a user's optimizer, a learning-rate sweep
    needs it to expose its rate (``optax.inject_hyperparams``); a single rate leaves it as
    it was built. ``train_examples`` (the training set before the validation split) sets
    the length of a scheduled learning rate.
    """
    return StateInit(config, train_examples, model=model, optimizer=optimizer)()


def _init_compile_options() -> dict[str, Any] | None:
    """XLA options for the initialisation program. It runs once, and on the CPU LLVM's -O3
    spends seconds on its random draws for no gain (-O2 takes a fraction of that), and the
    loop emitters (:data:`~mnist_jax.training.CPU_LOOP_EMITTERS`) shorten what is left;
    both give the same bits (checked for the recipes' models by tests/test_training.py)."""
    loop = loop_emitter_options()
    return None if loop is None else {"xla_backend_optimization_level": 2, **loop}


def epoch_compile_options(state: TrainState,
                          options: StepOptions = StepOptions()) -> tuple[tuple[str, Any], ...]:
    """The XLA options (name, value) that the training epoch of ``state``'s model compiles
    with on the CPU: the loop emitters (:data:`~mnist_jax.training.CPU_LOOP_EMITTERS`) for
    a :class:`~mnist_jax.models.CNN` whose fast conv stack computes channel-major (the
    speedrun's smallcnn); the library fusions
    (:data:`~mnist_jax.training.CPU_LIBRARY_FUSIONS`) for a model of the user's with
    convolution kernels that ``options.convs`` rewrites; none for anything else."""
    if jax.default_backend() != "cpu":
        return ()
    model = getattr(state.apply_fn, "__self__", None)
    if isinstance(model, models.CNN) and model.trains_channel_major:
        return tuple(CPU_LOOP_EMITTERS.items())
    if (not isinstance(model, (models.MLP, models.CNN, models.BNCNN))
            and convrewrite.resolve(options.convs) and _has_conv_kernels(state)):
        return tuple(CPU_LIBRARY_FUSIONS.items())
    return ()


def _has_conv_kernels(state: TrainState) -> bool:
    """Whether the model has a convolution's kernel: a parameter of 4 or more axes
    (5 or more when the state holds several models)."""
    stacked = np.ndim(state.step)  # a stacked state's step counts per model
    return any(np.ndim(p) >= 4 + stacked for p in jax.tree.leaves(state.params))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run decides once, before anything is compiled: its validated config, the
    step's options, the device mesh and the training data split off from validation
    (host arrays, by Keras' last-fraction rule). Made by :func:`plan_run`; read by
    :func:`check_training_fits` and :func:`fit`."""

    config: TrainConfig
    options: StepOptions
    mesh: Any
    dataset: data_lib.Dataset
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]


def plan_run(config: TrainConfig, dataset: data_lib.Dataset | None = None,
             loss: Callable | None = None, *, validate: bool = True) -> Plan:
    """Validate ``config`` (unless the caller just did: ``validate=False``) against
    ``dataset`` (default: loaded as ``config`` says) and the devices: a bad flag, too few
    devices or a batch larger than the training split is a :class:`UsageError` here,
    before any compilation."""
    if validate:
        config = config.validate()
    options = step_options(config, loss)
    if dataset is None:
        dataset = data_lib.load_dataset(config.dataset, config.data_dir)
    mesh = parallel.make_data_mesh(config.devices)
    parallel.check_batch_size(config.batch_size, mesh)
    tx, ty, vx, vy = data_lib.validation_split(dataset.train_images, dataset.train_labels,
                                               config.validation_split)
    if config.batch_size > len(tx):
        raise UsageError(f"invalid --batch-size {config.batch_size}: larger than the "
                         f"{len(tx)} training examples")
    return Plan(config, options, mesh, dataset, (tx, ty), (vx, vy))


def put_data(plan: Plan) -> DeviceData:
    """The plan's splits on its devices, replicated: every step gathers its batch there."""
    (tx, ty), (vx, vy), ds = plan.train, plan.val, plan.dataset
    put = lambda *a: tuple(parallel.replicate(np.asarray(x), plan.mesh) for x in a)
    # Several processes: each feeds its own part of every batch from the host copy.
    train = ((tx, ty.astype(np.int32)) if jax.process_count() > 1
             else put(tx, ty.astype(np.int32)))
    return DeviceData(train=train, test=put(ds.test_images, ds.test_labels.astype(np.int32)),
                      val=put(vx, vy.astype(np.int32)) if len(vx) else None)


MEMORY_LIMIT_ENV = "MNIST_JAX_MEMORY_LIMIT_BYTES"
"""Overrides the device memory that :func:`check_training_fits` compares against (bytes)."""

# One set of jitted functions per (batch size, models, sharding): the program compiled by
# check_training_fits is then the one fit runs (no second compilation).
_compiled_fns = functools.lru_cache(maxsize=8)(compile_fns)


def _run_fns(config: TrainConfig, mesh, options: StepOptions, state: TrainState) -> CompiledFns:
    """The jitted functions that train and evaluate ``state`` as ``config`` says."""
    return _compiled_fns(config.batch_size, config.num_models,
                         parallel.batch_sharding(mesh) if mesh.devices.size > 1 else None,
                         None, options, epoch_compile_options(state, options))


def available_memory(device=None) -> tuple[int | None, str]:
    """Bytes a run may use on ``device`` (default: the first local one) and where that
    figure comes from: ``$MNIST_JAX_MEMORY_LIMIT_BYTES``, the accelerator's
    ``memory_stats()['bytes_limit']``, or on CPU the physical RAM (``os.sysconf``)."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        try:
            return int(float(env)), f"${MEMORY_LIMIT_ENV}"
        except (ValueError, OverflowError):
            raise UsageError(f"invalid ${MEMORY_LIMIT_ENV} {env!r}: expected a number of "
                             "bytes") from None
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device memory"
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical RAM"
        except (ValueError, OSError, AttributeError):
            pass
    return None, "unknown"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB ({n:,} bytes)"


def check_training_fits(config: TrainConfig | Plan, dataset: data_lib.Dataset | None = None,
                        state: TrainState | None = None,
                        options: StepOptions | None = None) -> dict[str, Any]:
    """Refuse, before anything is trained or written, a run that cannot start.

    Checks what :func:`fit` would find only later: the device count and the batch size
    against the devices and the training examples (after the validation split), and the
    memory the compiled epoch program needs (XLA's ``memory_analysis()``: arguments —
    train state and data —, outputs and temporaries such as the activations of a batch,
    plus the test/validation arrays) against :func:`available_memory`. Raises UsageError
    stating needed and available bytes. ``config`` may be a :class:`Plan` already made
    (then ``dataset`` is the plan's, and ``options``, if given, replace its step options). ``state`` may be the arrays or only
    their shapes (:meth:`StateInit.shapes`: the program compiles while the arrays are
    made). Compiling here costs nothing extra: ``fit`` with that state (and step
    ``options``) reuses the program. Returns ``{"needed_bytes", "available_bytes",
    "memory_source", "compile_seconds"}``.
    """
    plan = config if isinstance(config, Plan) else plan_run(config, dataset)
    if options is not None:
        plan = dataclasses.replace(plan, options=options)
    config, options, mesh, dataset = plan.config, plan.options, plan.mesh, plan.dataset
    (tx, ty), (vx, vy) = plan.train, plan.val
    info: dict[str, Any] = {"needed_bytes": None, "available_bytes": None,
                            "memory_source": None, "compile_seconds": 0.0}
    if jax.process_count() > 1:  # each process feeds its part of the batch: not estimated
        return info
    rep = parallel.replicated(mesh)
    if state is None:
        state = StateInit(config, len(dataset.train_labels)).shapes()
    # the shapes are all the compiler needs: fit's replicated arrays match them
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=rep, weak_type=getattr(a, "weak_type", False)), state)
    fns = _run_fns(config, mesh, options, state)
    x = jax.ShapeDtypeStruct(tx.shape, np.uint8, sharding=rep)
    y = jax.ShapeDtypeStruct(ty.shape, np.int32, sharding=rep)
    t = time.perf_counter()
    compiled = fns.train_epoch.lower(state, x, y).compile()
    info["compile_seconds"] = time.perf_counter() - t
    try:
        m = compiled.memory_analysis()
        needed = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                  - m.alias_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):  # backend without the analysis
        return info
    needed += dataset.test_images.nbytes + 4 * len(dataset.test_labels) + vx.nbytes + 4 * len(vy)
    available, source = available_memory(mesh.devices.flat[0])
    info.update(needed_bytes=int(needed), available_bytes=available, memory_source=source)
    if available is not None and needed > available:
        raise UsageError(
            f"--batch-size {config.batch_size} does not fit: training the {model_name(config)} "
            f"({config.num_models} model(s)) needs about {_mib(needed)} of "
            f"{mesh.devices.flat[0].platform} memory, but {_mib(available)} are available "
            f"({source}); use a smaller --batch-size")
    return info


def _timed_compile(fn, *args) -> tuple[Callable, float]:
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t


def model_name(config: TrainConfig) -> str:
    return config.model if config.is_builtin_model else config.model.rpartition(":")[2]


def fit(config: TrainConfig | Plan, dataset: data_lib.Dataset | None = None, *,
        model=None, optimizer=None, loss: Callable | None = None,
        state: TrainState | None = None, history: Sequence[dict] = (),
        on_epoch: Callable[[int, TrainState, dict], None] | None = None) -> FitResult:
    """Train the model(s) of ``config``; resume from ``state``/``history`` if given.

    ``model`` is any Flax linen module (called as ``model.apply(variables, x, train=...)``)
    or an NNX model (called as ``model(x)`` after ``model.train()`` / ``model.eval()``):
    its class, or any callable called as ``f(rngs=nnx.Rngs(key))``, builds one model per
    seed and learning rate inside the compiled program; an instance trains as one model
    from its own weights. Either takes float32 images (B, 28, 28) in [0, 1] and returns
    logits (B, 10). ``optimizer`` (any ``optax.GradientTransformation``) and ``loss``
    (``loss(logits, labels)`` → per-example losses) replace what ``config`` describes;
    every seed of ``config.seeds`` trains its own copy in the one compiled program.
    ``config`` may be a :class:`Plan` already made (:func:`plan_run`: its dataset and loss
    are then the plan's). ``on_epoch(epoch, state, row)`` is called after every epoch with
    the 1-based epoch number, the new state and the metrics row (what ``metrics.jsonl``
    holds). Without a validation split every row also holds the test loss and accuracy
    (the Keras tutorial's ``validation_data`` is the test set); with
    ``config.validation_split`` the rows hold the validation figures and the test set is
    read once, after the last epoch (only that row has them), so nothing during training
    looks at it. Raises :class:`TrainingDiverged` (carrying the last good state) on a
    non-finite loss.
    """
    t_start = time.perf_counter()
    plan = config if isinstance(config, Plan) else plan_run(config, dataset, loss)
    config = plan.config
    dev = put_data(plan)
    if state is None:
        state = init_state(config, len(plan.dataset.train_labels), model=model,
                           optimizer=optimizer)
    state = parallel.replicate(state, plan.mesh)
    programs = _compile(plan, state, dev)
    history = list(history)
    steps = dev.train[0].shape[0] // config.batch_size
    epoch_seconds: list[float] = []
    te = None  # the newest test figures
    for epoch in range(state_step(state) // steps + 1, config.epochs + 1):
        state, row, te = _train_epoch(plan, programs, state, dev, epoch)
        history.append(row)
        epoch_seconds.append(row["epoch_seconds"])
        if on_epoch is not None:
            on_epoch(epoch, state, row)

    test = _test_figures(config, programs, state, dev, te)
    timings = {"compile_seconds": programs.train_seconds + programs.eval_seconds,
               "train_compile_seconds": programs.train_seconds,
               "epoch_seconds": epoch_seconds, "data_seconds": plan.dataset.load_seconds,
               "fit_seconds": time.perf_counter() - t_start}
    return FitResult(config, state, history, test, timings, programs.fns, dev)


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The compiled programs of one fit and the seconds their compilation took."""

    fns: CompiledFns
    epoch: Callable
    test: Callable
    val: Callable | None
    train_seconds: float
    eval_seconds: float


def _compile(plan: Plan, state: TrainState, dev: DeviceData) -> _Programs:
    """Compile the epoch (the one :func:`check_training_fits` compiled, if it ran) and the
    evaluation for ``state``'s shapes."""
    fns = _run_fns(plan.config, plan.mesh, plan.options, state)
    if jax.process_count() > 1:  # same program, batches assembled from every process
        epoch_fn = parallel.ProcessLocalEpoch(plan.mesh, plan.config.batch_size,
                                              plan.config.num_models, plan.options)
        c_train = epoch_fn.compile(state, *dev.train)
    else:
        epoch_fn, c_train = _timed_compile(fns.train_epoch, state, *dev.train)
    eval_fn, c_eval = _timed_compile(fns.evaluate, state, *dev.test)
    val_fn = _timed_compile(fns.evaluate, state, *dev.val)[0] if dev.val else None
    return _Programs(fns, epoch_fn, eval_fn, val_fn, c_train, c_eval)


def _train_epoch(plan: Plan, programs: _Programs, state: TrainState, dev: DeviceData,
                 epoch: int) -> tuple[TrainState, dict[str, Any], dict[str, Any] | None]:
    """One compiled epoch, then its metrics row (validation after every epoch, the test
    set after every epoch without a validation split, else after the last) and the test
    figures when it read the test set."""
    config = plan.config
    t = time.perf_counter()
    new_state, m = programs.epoch(state, *dev.train)
    m = to_host(m)
    seconds = time.perf_counter() - t
    bad = [s for s in np.ravel(m.first_bad_step) if s >= 0]
    if bad:
        raise TrainingDiverged(epoch, int(min(bad)), state)
    state = new_state
    row: dict[str, Any] = {"epoch": epoch, "train_loss": m.loss, "train_accuracy": m.accuracy,
                           f"train_loss{CURVE_SUFFIX}": m.loss_curve,
                           f"train_accuracy{CURVE_SUFFIX}": m.accuracy_curve}
    if programs.val is not None:
        v = to_host(programs.val(state, *dev.val))
        row.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
    te = None
    if programs.val is None or epoch == config.epochs:
        te = to_host(programs.test(state, *dev.test))
        row.update(test_loss=te["loss"], test_accuracy=te["accuracy"])
    row["epoch_seconds"] = seconds
    parallel.assert_same_on_all_processes(
        {k: np.asarray(v, np.float64) for k, v in row.items() if "loss" in k or "acc" in k},
        f"epoch {epoch} metrics")
    if config.num_models > 1:
        row["models"] = config.model_grid()
    return state, row, te


def _test_figures(config: TrainConfig, programs: _Programs, state: TrainState,
                  dev: DeviceData, te: dict[str, Any] | None) -> dict[str, Any]:
    """The final test figures: the last epoch's ``te``, or one evaluation when nothing was
    left to train (a finished run resumed); the ensemble's accuracy for several models."""
    if te is None:
        te = to_host(programs.test(state, *dev.test))
    test = {"loss": te["loss"], "accuracy": te["accuracy"], "keras_loss": te["keras_loss"]}
    if config.num_models > 1:
        test["ensemble_accuracy"] = ensemble_accuracy(programs.fns.predict(state, dev.test[0]),
                                                      dev.test[1])
    return test


def ensemble_accuracy(probs: jax.Array, labels: jax.Array) -> float:
    """Accuracy of the ensemble whose members' softmax probabilities are ``probs``
    (models, N, classes): the class of the mean probability."""
    mean = jnp.mean(jnp.asarray(probs), axis=0)
    return float(jnp.mean(jnp.argmax(mean, -1) == jnp.asarray(labels)))


def summarize_models(config: TrainConfig, test: dict[str, Any]) -> dict[str, Any]:
    """Per-model test figures, their mean ± std (population std, ddof=0) and, for
    several models, the ensemble's accuracy (mean of their softmax probabilities)."""
    losses = np.atleast_1d(test["loss"]).tolist()
    accs = np.atleast_1d(test["accuracy"]).tolist()
    keras = np.atleast_1d(test.get("keras_loss", np.nan)).tolist()
    one = len(losses) == 1
    out: dict[str, Any] = {"test_loss": losses[0] if one else losses,
                           "test_accuracy": accs[0] if one else accs,
                           "test_keras_loss": keras[0] if len(keras) == 1 else keras}
    if config.num_models > 1:
        out.update(test_accuracy_mean=float(np.mean(accs)), test_accuracy_std=float(np.std(accs)),
                   test_accuracy_min=float(np.min(accs)),
                   test_loss_mean=float(np.mean(losses)), test_loss_std=float(np.std(losses)),
                   per_model=[dict(m, test_loss=l, test_accuracy=a)
                              for m, l, a in zip(config.model_grid(), losses, accs)])
        if "ensemble_accuracy" in test:
            out["ensemble_test_accuracy"] = test["ensemble_accuracy"]
    return out


def device_description() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": getattr(d, "device_kind", str(d)),
            "count": jax.device_count(), "process_count": jax.process_count()}


def predict(state: TrainState, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, 10) for uint8 images (N, 28, 28) with one model's state
    (for a stacked state: ``mnist_jax.unstack_state(state, i)``)."""
    from mnist_jax.training import predict_probs
    _check_single(state)
    fn = jax.jit(predict_probs, static_argnums=2, compiler_options=loop_emitter_options())
    return np.asarray(fn(state, jnp.asarray(images), batch_size))


def predict_classes(state: TrainState, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted digit per image, like Keras' ``predict_classes``."""
    return predict(state, images, batch_size).argmax(-1)


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> dict[str, float]:
    """Test loss and accuracy of one model's state, like Keras' ``evaluate``.

    ``loss`` is the exact cross-entropy; ``keras_loss`` the figure Keras reports (its
    probabilities clipped to [1e-7, 1 - 1e-7]). For a stacked state (several seeds),
    take one model out first: ``mnist_jax.unstack_state(state, i)``.
    """
    from mnist_jax.training import eval_metrics
    _check_single(state)
    fn = jax.jit(eval_metrics, static_argnums=3, compiler_options=loop_emitter_options())
    m = fn(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), batch_size)
    return {k: float(v) for k, v in m.items()}


def _check_single(state: TrainState) -> None:
    if np.ndim(state.step) != 0:
        raise UsageError(f"this state stacks {np.shape(state.step)[0]} models; take one out "
                         "with mnist_jax.unstack_state(state, i)")


def predict_images(state: TrainState, paths: Sequence[str], batch_size: int = 1000
                   ) -> list[dict[str, Any]]:
    """Predict digits in image files or folders (PNG, JPEG, BMP, GIF, TIFF, …).

    Each image is made MNIST-like first (:func:`mnist_jax.images.to_mnist`).
    Returns one ``{"file", "class", "probabilities"}`` dict per readable image;
    unreadable images inside folders are skipped (named in ``"error"`` entries).
    """
    from mnist_jax.images import iter_image_batches
    out: list[dict[str, Any]] = []
    for files, batch, errors in iter_image_batches(paths, batch_size=batch_size):
        out.extend({"file": str(p), "error": msg} for p, msg in errors)
        if len(files):
            probs = predict(state, batch, batch_size)
            out.extend({"file": str(p), "class": int(pr.argmax()), "probabilities": pr.tolist()}
                       for p, pr in zip(files, probs))
    return out
