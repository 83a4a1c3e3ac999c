"""Training and evaluation: pure, jit-compiled functions over an explicit train state.

Data flows one way: uint8 arrays are put on the device once; each epoch is ONE
compiled program (:func:`train_epoch`) that draws a permutation from the state's
RNG, gathers the shuffled batches on the device and runs every step under
``lax.scan``. Everything that makes a run differ (init, dropout, shuffling) is
derived from the state's ``rng`` and ``step``, so

* the same seed gives bitwise the same run,
* a run resumed from a checkpoint of its state continues exactly, and
* several runs are one program over a stacked state (seeds, lrs): ``jax.vmap``, or
  on CPU ``lax.map`` (see :func:`default_model_axis`).

Any Flax module called as ``model.apply(variables, images, train=...)`` on float32
images (B, 28, 28) in [0, 1], returning logits, trains here. Its collections other
than ``params`` (e.g. BatchNorm's ``batch_stats``) ride in :attr:`TrainState.model_state`:
updated by every training step, used by evaluation, checkpointed and stacked per model
with the rest of the state. What a step computes besides the model (the loss, the
on-device augmentation) is a hashable :class:`StepOptions`, fixed when compiling.

Sharding over devices is XLA's: params are replicated and the batch axis is
constrained to the ``data`` axis of a mesh (see :mod:`mnist_jax.parallel`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding

from flax import struct

from mnist_jax import augment as augment_lib
from mnist_jax import convrewrite
from mnist_jax.config import OPTIMIZERS, SCHEDULES
from mnist_jax.errors import UsageError


# fold_in tags that keep the RNG streams of a run apart.
_INIT, _DROPOUT, _SHUFFLE, _AUGMENT = 0, 1, 2, 3


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the run's root RNG key (raw ``uint32[2]``) and the model's
    mutable collections (``{"batch_stats": ...}`` for BatchNorm; ``{}`` for none)."""

    rng: jax.Array
    model_state: Any = struct.field(default_factory=dict)

    @property
    def variables(self) -> dict[str, Any]:
        """What ``model.apply`` takes: ``{"params": ..., **model_state}``."""
        return {"params": self.params, **self.model_state}


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Softmax cross-entropy on integer labels, per example; ``label_smoothing`` mixes
    the one-hot target with the uniform distribution (0: the exact loss)."""

    label_smoothing: float = 0.0

    def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if not self.label_smoothing:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                      self.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static parts of a training step: the per-example ``loss(logits, labels)``,
    the augmentation drawn on the device (None: none) and how the model's convolutions
    run (``convs``, one of :data:`mnist_jax.convrewrite.CHOICES`: "auto" computes them
    as im2col + matmul on the CPU, see :func:`mnist_jax.convrewrite.fast_convolutions`;
    "xla" leaves them to XLA). Hashable, so that one compiled program serves every call
    with equal options."""

    loss: Callable[[jax.Array, jax.Array], jax.Array] = CrossEntropy()
    augment: augment_lib.AugmentSpec | None = None
    convs: str = "auto"


# Points of the within-epoch training curve: a one-epoch run (the speedrun) still gets a
# learning curve, and a long run's metrics.jsonl stays small.
CURVE_POINTS = 10


class EpochMetrics(NamedTuple):
    """What one compiled epoch returns (per model when vmapped): the epoch's mean training
    loss and accuracy, and the same over ``CURVE_POINTS`` consecutive stretches of its steps."""

    loss: jax.Array
    accuracy: jax.Array
    first_bad_step: jax.Array  # index of the first step with a non-finite loss, or -1
    loss_curve: jax.Array
    accuracy_curve: jax.Array


def stretch_means(values: jax.Array, points: int = CURVE_POINTS) -> jax.Array:
    """Means of ``min(points, steps)`` consecutive, nearly equal stretches of the per-step
    ``values`` (steps,): the bounds are static, so this compiles into the epoch."""
    bounds = np.linspace(0, values.shape[0], min(points, values.shape[0]) + 1).round().astype(int)
    return jnp.stack([values[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])


def make_optimizer(learning_rate: float = 1e-3, eps: float = 1e-7, schedule: str = "constant",
                   decay_steps: int | None = None, *, name: str = "adam",
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                   momentum: float = 0.0, warmup: float = 0.0) -> optax.GradientTransformation:
    """Keras' Adam by default (``name="adam"``, eps 1e-7), or AdamW / SGD; the learning
    rate is an injected hyperparameter so that a sweep can give every model its own.

    ``schedule`` scales every update over ``decay_steps`` (the whole run):
    ``"cosine"``: cosine decay from 1 to 0 (after a linear warm-up over the first
    ``warmup`` fraction, if any); ``"onecycle"``: the one-cycle policy (up from 1/25
    over ``warmup`` of the run, default 0.25, then cosine down to 1/25e4).
    """
    if name == "adam":
        base = optax.inject_hyperparams(optax.adam)(
            learning_rate=learning_rate, b1=betas[0], b2=betas[1], eps=eps)
    elif name == "adamw":
        base = optax.inject_hyperparams(optax.adamw)(
            learning_rate=learning_rate, b1=betas[0], b2=betas[1], eps=eps,
            weight_decay=weight_decay)
    elif name == "sgd":
        base = optax.inject_hyperparams(optax.sgd)(
            learning_rate=learning_rate, momentum=momentum or None)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if schedule == "constant":
        return base
    if not decay_steps or decay_steps < 1:
        raise ValueError(f"the {schedule} schedule needs decay_steps >= 1, got {decay_steps}")
    if schedule == "cosine":
        warm = int(round(warmup * decay_steps))
        multiplier = (optax.warmup_cosine_decay_schedule(0.0, 1.0, warm, decay_steps)
                      if warm else optax.cosine_decay_schedule(1.0, decay_steps))
    elif schedule == "onecycle":
        multiplier = optax.cosine_onecycle_schedule(decay_steps, 1.0, pct_start=warmup or 0.25)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    return optax.chain(base, optax.scale_by_schedule(multiplier))


def _is_injected(x: Any) -> bool:
    # optax.inject_hyperparams' state (InjectStatefulHyperparamsState in newer optax):
    # a tuple with a ``hyperparams`` dict.
    return isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict)


def injected_hyperparams(opt_state: Any) -> dict[str, jax.Array] | None:
    """The hyperparameters dict of the first ``optax.inject_hyperparams`` state inside
    ``opt_state`` (any nesting of chains), or None when the optimizer injects none."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(x)]
    return found[0].hyperparams if found else None


def exposes_learning_rate(tx: optax.GradientTransformation) -> bool:
    """Whether ``tx``'s state carries an injected ``learning_rate`` that a sweep can set."""
    hp = injected_hyperparams(jax.eval_shape(tx.init, {"w": jnp.zeros(())}))
    return hp is not None and "learning_rate" in hp


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       learning_rate: float | None = None, input_shape=(1, 28, 28)) -> TrainState:
    """A fresh state: variables initialised from ``seed``, optimizer state, step 0.

    ``learning_rate`` overrides the one ``tx`` was made with (its injected
    ``learning_rate``, see :func:`make_optimizer`); states that share ``tx`` can then
    be stacked into one sweep. Collections other than ``params`` (BatchNorm's
    ``batch_stats``) become the state's ``model_state``.
    """
    rng = jax.random.PRNGKey(seed)
    variables = dict(model.init(jax.random.fold_in(rng, _INIT), jnp.zeros(input_shape),
                                train=False))
    params = variables.pop("params")
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,
                              model_state=variables)
    # Flax starts ``step`` as the Python int 0; make it the int32 array that every later
    # state holds, so that a fresh state is a faithful restore template (a Python int
    # would come back from a checkpoint as int64 and fail its checksum).
    state = state.replace(step=jnp.zeros((), jnp.int32))
    if learning_rate is not None:
        hp = injected_hyperparams(state.opt_state)
        if hp is None or "learning_rate" not in hp:
            raise UsageError("this optimizer does not expose its learning rate (wrap it in "
                             "optax.inject_hyperparams) so it cannot be set per model")
        hp["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return state


def stack_states(states: list[TrainState]) -> TrainState:
    """Stack same-structured states along a new leading "model" axis for vmap."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(state: TrainState, i: int) -> TrainState:
    """Model ``i`` of a stacked state."""
    return jax.tree.map(lambda x: x[i], state)


def _prepare(images: jax.Array) -> jax.Array:
    """uint8 (B, 28, 28) → float32 in [0, 1]: the tutorial's ``/ 255``."""
    return images.astype(jnp.float32) / 255.0


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def _apply(state: TrainState, x: jax.Array, *, train: bool, rngs=None, convs: str = "xla"):
    """``model.apply`` on the state's variables → (logits, new model_state); its
    convolutions rewritten into the fast CPU form when ``convs`` says so (the rewrite
    happens here, before the loss is differentiated)."""
    mutable = list(state.model_state) if train and state.model_state else None

    def apply(variables, x, rngs):
        if mutable:
            return state.apply_fn(variables, x, train=True, rngs=rngs, mutable=mutable)
        return state.apply_fn(variables, x, train=train, rngs=rngs)

    if convrewrite.resolve(convs):
        apply = convrewrite.fast_convolutions(apply)
    out = apply(state.variables, x, rngs)
    return out if mutable else (out, state.model_state)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               options: StepOptions = StepOptions()) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of uint8 images; returns the new state and batch metrics.

    The step's dropout and augmentation keys are the state's rng folded with the step,
    so a step is a pure function of the state and the batch.
    """
    dropout_key = jax.random.fold_in(jax.random.fold_in(state.rng, _DROPOUT), state.step)
    x = _prepare(images)
    if options.augment is not None and options.augment.enabled:
        augment_key = jax.random.fold_in(jax.random.fold_in(state.rng, _AUGMENT), state.step)
        x = augment_lib.augment(augment_key, x, options.augment)

    def loss_fn(params):
        logits, model_state = _apply(state.replace(params=params), x, train=True,
                                     rngs={"dropout": dropout_key}, convs=options.convs)
        loss = options.loss(logits, labels)
        return loss.mean(), (_correct(logits, labels).mean(), model_state)

    (loss, (accuracy, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads).replace(model_state=model_state)
    return state, {"loss": loss, "accuracy": accuracy}


def epoch_permutation(state: TrainState, num_examples: int, batch_size: int) -> jax.Array:
    """The (steps, batch_size) example indices of the epoch that ``state`` is at.

    The permutation depends only on the state's rng and its epoch number
    (``step // steps``), so a resumed run shuffles exactly as an uninterrupted one.
    The last partial batch is dropped (a new one each epoch), to keep shapes static.
    """
    steps = num_examples // batch_size
    epoch = state.step // steps
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _SHUFFLE), epoch)
    return jax.random.permutation(key, num_examples)[: steps * batch_size].reshape(steps, batch_size)


def run_steps(state: TrainState, batches_x: jax.Array, batches_y: jax.Array,
              batch_sharding: NamedSharding | None = None,
              options: StepOptions = StepOptions()) -> tuple[TrainState, EpochMetrics]:
    """Scan :func:`train_step` over pre-gathered batches ``(steps, B, ...)``."""

    def body(state, batch):
        x, y = batch
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
            y = jax.lax.with_sharding_constraint(y, batch_sharding)
        return train_step(state, x, y, options)

    state, m = jax.lax.scan(body, state, (batches_x, batches_y))
    finite = jnp.isfinite(m["loss"])
    first_bad = jnp.where(finite.all(), -1, jnp.argmin(finite)).astype(jnp.int32)
    return state, EpochMetrics(m["loss"].mean(), m["accuracy"].mean(), first_bad,
                               stretch_means(m["loss"]), stretch_means(m["accuracy"]))


def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, batch_size: int,
                batch_sharding: NamedSharding | None = None,
                options: StepOptions = StepOptions()) -> tuple[TrainState, EpochMetrics]:
    """One whole epoch as a pure function: shuffle on the device, then scan the steps
    (each augmenting its batch on the device when ``options.augment`` says so)."""
    idx = epoch_permutation(state, images.shape[0], batch_size)
    return run_steps(state, images[idx], labels[idx], batch_sharding, options)


def _pad_to_batches(n: int, batch_size: int) -> tuple[int, int]:
    steps = -(-n // batch_size)
    return steps, steps * batch_size - n


def _batched_apply(state: TrainState, images: jax.Array, batch_size: int,
                   out_fn: Callable, convs: str = "auto") -> Any:
    """Apply the model (inference mode) to ``images`` in fixed-size batches under ``lax.map``.

    Pads the tail batch so every batch has the same shape; ``out_fn(logits)`` is
    applied per batch and the padding is cut off again. ``convs`` as in :class:`StepOptions`,
    except that "auto" leaves inference to XLA's convolutions (only "fast" rewrites them)."""
    n = images.shape[0]
    steps, pad = _pad_to_batches(n, batch_size)
    x = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    x = x.reshape(steps, batch_size, *images.shape[1:])
    # "auto" keeps XLA's convolutions for inference, as the preset CNNs do: without
    # gradients XLA:CPU's conv is as fast as the rewrite or faster (docs/cpu-convolutions.md)
    convs = "xla" if convs == "auto" else convs
    out = jax.lax.map(lambda b: out_fn(_apply(state, _prepare(b), train=False,
                                              convs=convs)[0]), x)
    return jax.tree.map(lambda o: o.reshape(steps * batch_size, *o.shape[2:])[:n], out)


KERAS_EPSILON = 1e-7
"""Keras' ``categorical_crossentropy`` clips probabilities to [eps, 1 - eps]."""


def eval_metrics(state: TrainState, images: jax.Array, labels: jax.Array,
                 batch_size: int = 1000, convs: str = "auto") -> dict[str, jax.Array]:
    """Mean cross-entropy loss and accuracy of ``state`` on a whole labelled set.

    ``loss`` is the exact cross-entropy; ``keras_loss`` is the figure Keras'
    ``evaluate`` reports, with probabilities clipped to [1e-7, 1 - 1e-7] (so no
    example counts more than -log 1e-7 = 16.1). ``convs`` as in :class:`StepOptions`.
    """
    logits = _batched_apply(state, images, batch_size, lambda lg: lg.astype(jnp.float32),
                            convs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    p_true = jnp.take_along_axis(jax.nn.softmax(logits, -1), labels[:, None], -1)[:, 0]
    keras = -jnp.log(jnp.clip(p_true, KERAS_EPSILON, 1.0 - KERAS_EPSILON))
    return {"loss": loss.mean(), "accuracy": _correct(logits, labels).mean(),
            "keras_loss": keras.mean()}


def predict_probs(state: TrainState, images: jax.Array, batch_size: int = 1000,
                  convs: str = "auto") -> jax.Array:
    """Softmax class probabilities (N, 10) for uint8 images (N, 28, 28) (``convs`` as in
    :class:`StepOptions`)."""
    return _batched_apply(state, images, batch_size,
                          lambda lg: jax.nn.softmax(lg.astype(jnp.float32), -1), convs)


@dataclasses.dataclass(frozen=True)
class CompiledFns:
    """The jit-compiled functions of one run; vmapped when it trains several models."""

    train_epoch: Callable
    evaluate: Callable
    predict: Callable


MODEL_AXIS_ENV = "MNIST_JAX_MODEL_AXIS"
"""Overrides :func:`default_model_axis` ("vmap" or "map"), e.g. for benchmarks."""


def default_model_axis(platform: str | None = None) -> str:
    """How several models (seeds × lrs) share ONE compiled program on ``platform``.

    * ``"vmap"``: batched over the model axis; every op works on all models at
      once (batched matmuls). Best on GPUs/TPUs, where one model leaves the chip idle.
    * ``"map"``: ``lax.map`` over the model axis; inside the program the models
      run one after another with exactly the kernels of a single model. On CPU
      XLA's batched matmuls (the MLP's dense layers under vmap) cost more per
      model than the plain ones, and the vmapped epoch gathers and transposes
      every model's shuffled dataset at once, so "map" is the CPU default (see
      ``benchmarks/seeds_vmap.py``). It also makes model *i* of a sweep bitwise
      equal to a run with that seed/lr alone.

    ``$MNIST_JAX_MODEL_AXIS`` overrides the choice.
    """
    env = os.environ.get(MODEL_AXIS_ENV, "").strip().lower()
    if env:
        if env not in ("vmap", "map"):
            raise ValueError(f"invalid ${MODEL_AXIS_ENV} {env!r}: choose vmap or map")
        return env
    return "map" if (platform or jax.default_backend()) == "cpu" else "vmap"


def over_models(fn: Callable, n_shared: int, model_axis: str) -> Callable:
    """``fn(state, *shared)`` → the same over a stacked state (leading model axis),
    by ``jax.vmap`` or ``lax.map`` (see :func:`default_model_axis`)."""
    if model_axis == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * n_shared)
    if model_axis == "map":
        def over(state, *shared):
            return jax.lax.map(lambda s: fn(s, *shared), state)
        # named as ``fn`` (not "<lambda>") in compile logs, events and profiles
        over.__name__ = over.__qualname__ = (getattr(fn, "__name__", None)
                                             or getattr(getattr(fn, "func", None), "__name__",
                                                        "over_models"))
        return over
    raise ValueError(f"model_axis must be 'vmap' or 'map', got {model_axis!r}")


CPU_LOOP_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
"""XLA:CPU's older loop emitters instead of its MLIR fusion emitters. They compile a
program in a fraction of the time and gave the same bits for every program checked
(tests/test_training.py), but run elementwise-heavy steps slower (the MLP's epoch). So they
compile a run's one-off programs (initialisation, evaluation, prediction) and, of the
training epochs, only the channel-major conv stack's (the speedrun's smallcnn, whose steps
they make faster). Figures: the docs' Benchmarks page."""


CPU_LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,"
                       "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}
"""XLA:CPU's library (YNNPACK) fusions of matrix products with the elementwise work and
reductions around them. A user's conv net whose convolutions :mod:`mnist_jax.convrewrite`
rewrote (XLA convolutions with plain-layout gradients, matrix products, BatchNorm's
reductions) trains faster with them; the built-in models and a plain MLP do not, and
Flax's per-step loop runs slower with them. Figures: the docs' Benchmarks page."""


def loop_emitter_options(platform: str | None = None) -> dict[str, Any] | None:
    """:data:`CPU_LOOP_EMITTERS` on the CPU backend (or ``platform``), else None."""
    return dict(CPU_LOOP_EMITTERS) if (platform or jax.default_backend()) == "cpu" else None


def compile_fns(batch_size: int, num_models: int,
                batch_sharding: NamedSharding | None = None,
                model_axis: str | None = None,
                options: StepOptions = StepOptions(),
                epoch_options: tuple[tuple[str, Any], ...] = ()) -> CompiledFns:
    """jit the pure functions; over the model axis when ``num_models > 1``, as
    ``model_axis`` says (default: :func:`default_model_axis`). Evaluation and prediction
    compile with :func:`loop_emitter_options`, the epoch with the XLA options
    ``epoch_options`` ((name, value) pairs, hashable so that compiled functions can be
    cached; :func:`mnist_jax.run.epoch_compile_options` picks them for a model)."""
    epoch = functools.partial(train_epoch, batch_size=batch_size, batch_sharding=batch_sharding,
                              options=options)
    evaluate = functools.partial(eval_metrics, convs=options.convs)
    predict = functools.partial(predict_probs, convs=options.convs)
    if num_models > 1:
        axis = model_axis or default_model_axis()
        epoch = over_models(epoch, 2, axis)
        evaluate = over_models(evaluate, 2, axis)
        predict = over_models(predict, 1, axis)
    one_off = loop_emitter_options()
    return CompiledFns(jax.jit(epoch, compiler_options=dict(epoch_options) or None),
                       jax.jit(evaluate, compiler_options=one_off),
                       jax.jit(predict, compiler_options=one_off))


def to_host(tree: Any) -> Any:
    """Device arrays → numpy / Python floats (one transfer)."""
    return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))
