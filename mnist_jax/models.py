"""The Keras-tutorial MNIST models, and the recipes' models, in Flax linen.

* :class:`MLP` -- ``Dense(784) -> Dropout(0.4) -> ReLU -> Dense(10)``.
* :class:`CNN` -- the classic Keras MNIST convnet (or the tutorial appendix's
  "conv -> ReLU -> max-pool, repeated" variant via ``pool_after``; the preset
  ``create_model("convnet")`` is keras.io's small "Simple MNIST convnet" built so,
  and ``create_model("smallcnn")`` the one-epoch record's net).
* :class:`BNCNN` -- a CNN with BatchNorm after every block, for the ``best`` recipe.

Both return **logits** (float32); softmax is applied by the loss
(``optax.softmax_cross_entropy*``) or by prediction code.

The CNN has two numerically equivalent implementations sharing one parameter
tree: ``impl="xla"`` (``nn.Conv`` / ``nn.max_pool``) and ``impl="fast"``, the
im2col conv stack with its own gradient in :mod:`mnist_jax.fastconv`, tuned for
XLA's CPU backend.  ``impl="auto"`` picks "fast" to train on the CPU backend and
"xla" elsewhere, including inference on the CPU, where XLA's own convolution runs
the forward pass about twice as fast as im2col.

Parameter counts, the Keras-style summary and FLOP counts are in
:mod:`mnist_jax.summary`; the names of the models in :mod:`mnist_jax.names`.
"""

from __future__ import annotations

import collections.abc
import numbers
import types
import typing
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mnist_jax import fastconv
from mnist_jax.augment import center_zoom
from mnist_jax.dropout import Dropout  # nn.Dropout with a cheap hashed mask
from mnist_jax.names import IMPLS
from mnist_jax.names import MODELS as MODEL_NAMES

__all__ = ["MLP", "CNN", "BNCNN", "ACTIVATIONS", "MODEL_NAMES", "MNIST_MEAN_STD", "INITS",
           "initializers", "create_model"]

MNIST_MEAN_STD = (0.1307, 0.3081)
"""Mean and standard deviation of MNIST's training pixels in [0, 1] (torchvision's)."""

INITS = ("lecun", "torch")
"""Parameter initialisations of :class:`CNN`: Flax's default and PyTorch's."""


def initializers(init: str, fan_in: int) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """``(kernel_init, bias_init)`` of a layer with ``fan_in`` inputs per output.

    "lecun": Flax's default (LeCun normal kernel, zero bias). "torch": PyTorch's default
    for ``Conv2d`` and ``Linear`` (kernel and bias uniform in ±1/√fan_in), a third of
    LeCun's variance; recipes written for PyTorch are tuned to it.
    """
    if init == "lecun":
        return nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    if init != "torch":
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    bound = fan_in ** -0.5

    def uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
    "swish": jax.nn.swish,
    "softplus": jax.nn.softplus,
    "leaky_relu": jax.nn.leaky_relu,
    "relu6": jax.nn.relu6,
    "mish": jax.nn.mish,
}
"""Activation names accepted by :class:`MLP` (each a ``jax.nn`` function)."""

# --------------------------------------------------------------------------
# Small parameter-free layers (modules so that summary() lists them).
# --------------------------------------------------------------------------


class Activation(nn.Module):
    """Element-wise activation layer (Keras ``Activation``)."""

    fn: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.fn](x)


class Flatten(nn.Module):
    """Flattens all but the batch axis."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class MaxPool(nn.Module):
    """Non-overlapping ``size x size`` max pooling, VALID (Keras ``MaxPooling2D``)."""

    size: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.size, self.size)
        return nn.max_pool(x, s, strides=s, padding="VALID")


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        )


def _check_rates(module: nn.Module, *fields: str) -> None:
    for name in fields:
        if not 0 <= getattr(module, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(module, name)!r}")


def _check_conv_net(module: nn.Module) -> None:
    """What :class:`CNN` and :class:`BNCNN` both require of their fields."""
    if module.impl not in IMPLS:
        raise ValueError(f"unknown impl {module.impl!r}; choose one of {list(IMPLS)}")
    if not module.features:
        raise ValueError("features must name at least one conv layer")
    if module.pool_after is not None and len(module.pool_after) != len(module.features):
        raise ValueError("pool_after must have one entry per conv layer")
    _check_rates(module, "conv_dropout", "dense_dropout")
    _check_sizes(module, "features", "kernel_size", "dense", "num_classes")


def _check_sizes(module: nn.Module, *fields: str) -> None:
    """Layer widths and kernel sizes: positive (one, or each of a sequence)."""
    for name in fields:
        value = getattr(module, name)
        if not all(v >= 1 for v in (value if isinstance(value, Sequence) else (value,))):
            raise ValueError(f"{name} must be positive, got {value!r}")


# --------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------


class MLP(nn.Module):
    """The Keras tutorial MLP: ``[Dense(h) -> Dropout -> act]* -> Dense(classes)``.

    Defaults give exactly ``Dense(784) -> Dropout(0.4) -> ReLU -> Dense(10)``
    (623,290 parameters).  Inputs ``(B,28,28)``, ``(B,28,28,1)`` or ``(B,784)``
    are flattened.  Returns float32 logits; apply softmax in the loss/predict.
    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); params stay float32.
    """

    hidden: Sequence[int] = (784,)
    dropout: float = 0.4
    activation: str = "relu"
    num_classes: int = 10
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_activation(self.activation)
        _check_rates(self, "dropout")
        _check_sizes(self, "hidden", "num_classes")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = Flatten(name="flatten")(jnp.asarray(x, dtype))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=dtype, name=f"dense_{i}")(x)
            x = Dropout(self.dropout, deterministic=not train, name=f"dropout_{i}")(x)
            x = Activation(self.activation, name=f"act_{i}")(x)
        x = nn.Dense(self.num_classes, dtype=dtype, name=f"dense_{len(self.hidden)}")(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------


class CNN(nn.Module):
    """Keras MNIST convnet: ``[Conv(f) -> ReLU (-> MaxPool)]* -> Dropout ->
    Flatten -> [Dense -> ReLU -> Dropout]* -> Dense(classes)``.

    Defaults are the classic Keras example (Conv32-Conv64 3x3 VALID, MaxPool 2
    after the last conv, Dropout .25, Dense 128, Dropout .5, Dense 10;
    1,199,882 params).  ``pool_after=None`` pools only after the last conv;
    ``pool_after=(True, True)`` pools after each conv (tutorial appendix).
    ``kernel_size`` is one square size for every conv, or one per conv layer
    (e.g. ``features=(24, 32), kernel_size=(5, 3)``). ``input_norm=(mean, std)``
    standardises the [0, 1] input first. ``weight_init``: "lecun" (Flax's default) or "torch"
    (PyTorch's, see :func:`initializers`).
    Input ``(B,28,28)`` or ``(B,28,28,1)``; returns float32 logits.

    ``impl``: "xla" (``nn.Conv``/``nn.max_pool``), "fast" (fused custom-VJP
    im2col blocks, best to train on CPU; falls back to "xla" for paddings other
    than VALID/SAME) or "auto" ("fast" when training on the CPU backend, else
    "xla": inference on the CPU is faster with XLA's convolution).
    Both use the same parameter tree.
    """

    features: Sequence[int] = (32, 64)
    kernel_size: int | Sequence[int] = 3
    pool_after: Sequence[bool] | None = None
    pool_size: int = 2
    conv_dropout: float = 0.25
    dense: Sequence[int] = (128,)
    dense_dropout: float = 0.5
    num_classes: int = 10
    padding: str = "VALID"
    dtype: Any = jnp.float32
    impl: str = "auto"
    input_norm: tuple[float, float] | None = None
    weight_init: str = "lecun"

    def __post_init__(self) -> None:
        _check_conv_net(self)
        if self.weight_init not in INITS:
            raise ValueError(f"unknown weight_init {self.weight_init!r}; choose one of {list(INITS)}")
        if isinstance(self.kernel_size, Sequence) and len(self.kernel_size) != len(self.features):
            raise ValueError("kernel_size must be one size or have one entry per conv layer")
        _check_sizes(self, "pool_size")
        super().__post_init__()

    @property
    def resolved_impl(self) -> str:
        """The implementation training uses: "xla" or "fast"."""
        return self.impl_for(train=True)

    @property
    def trains_channel_major(self) -> bool:
        """Whether training computes the conv stack in the fast implementation's
        channel-major layout (:func:`mnist_jax.fastconv.computes_channel_major`; MNIST's
        one-channel images)."""
        return (self.resolved_impl == "fast"
                and fastconv.computes_channel_major(self._kernel_sizes()[0], 1))

    def impl_for(self, train: bool) -> str:
        """The implementation a call with this ``train`` flag uses: "xla" or "fast"."""
        impl = self.impl
        if impl == "auto":
            impl = "fast" if train and jax.default_backend() == "cpu" else "xla"
        if impl == "fast" and self.padding.upper() not in fastconv.PADDINGS:
            impl = "xla"
        return impl

    def _pools(self) -> list[bool]:
        if self.pool_after is None:
            return [i == len(self.features) - 1 for i in range(len(self.features))]
        return [bool(p) for p in self.pool_after]

    def _kernel_sizes(self) -> list[int]:
        if isinstance(self.kernel_size, Sequence):
            return [int(k) for k in self.kernel_size]
        return [int(self.kernel_size)] * len(self.features)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = _standardize(jnp.asarray(x, dtype), self.input_norm)
        layers = list(zip(self.features, self._kernel_sizes(), self._pools()))
        if self.impl_for(train) == "fast":
            ws, bs, cfg = [], [], []
            cin = x.shape[-1]
            for i, (f, k, pool) in enumerate(layers):
                kinit, binit = initializers(self.weight_init, k * k * cin)
                w, b = fastconv.ConvParams(f, k, cin, kinit, binit, name=f"conv_{i}")()
                ws.append(w.astype(dtype))
                bs.append(b.astype(dtype))
                cfg.append(fastconv.layer_config(self.padding, k, self.pool_size if pool else 0))
                cin = f
            x = fastconv.conv_stack(x, ws, bs, cfg)
        else:
            for i, (f, k, pool) in enumerate(layers):
                kinit, binit = initializers(self.weight_init, k * k * x.shape[-1])
                x = nn.Conv(f, (k, k), padding=self.padding, dtype=dtype, kernel_init=kinit,
                            bias_init=binit, name=f"conv_{i}")(x)
                x = Activation("relu", name=f"conv_act_{i}")(x)
                if pool:
                    x = MaxPool(self.pool_size, name=f"pool_{i}")(x)
        x = Dropout(self.conv_dropout, deterministic=not train, name="conv_dropout")(x)
        x = Flatten(name="flatten")(x)
        for i, width in enumerate((*self.dense, self.num_classes)):
            kinit, binit = initializers(self.weight_init, x.shape[-1])
            x = nn.Dense(width, dtype=dtype, kernel_init=kinit, bias_init=binit,
                         name=f"dense_{i}")(x)
            if i < len(self.dense):
                x = Activation("relu", name=f"dense_act_{i}")(x)
                x = Dropout(self.dense_dropout, deterministic=not train,
                            name=f"dense_dropout_{i}")(x)
        return x.astype(jnp.float32)


def _standardize(x: jax.Array, norm: tuple[float, float] | None) -> jax.Array:
    """(B, H, W[, C]) images → NHWC, standardised by ``norm=(mean, std)`` if given."""
    if x.ndim == 3:
        x = x[..., None]
    return x if norm is None else (x - norm[0]) / norm[1]


class BNCNN(nn.Module):
    """A BatchNorm CNN: ``[Conv 3x3 -> ReLU (-> MaxPool) -> BatchNorm]* -> Dropout ->
    Flatten -> Dense -> ReLU -> BatchNorm -> Dropout -> Dense(classes)``.

    Defaults: Conv32, Conv32-pool, Conv64, Conv64-pool (VALID), Dense 256, dropouts
    0.25 / 0.4 (the ``best`` recipe sets 0.1 / 0.2); inputs standardised with MNIST's mean
    and std. BatchNorm follows each conv block (after the ReLU and the pool) so that the
    conv -> ReLU -> pool part stays one :mod:`mnist_jax.fastconv` block per layer on the
    CPU (``impl`` as in :class:`CNN`). Its ``batch_stats`` collection is carried by the
    train state.

    ``input_zoom`` enlarges every input about its centre first
    (:func:`~mnist_jax.augment.center_zoom`), in training, evaluation and prediction
    alike: ttdoucet/mnist's 25x25 centre crop resized to 28x28 is 1.12 (tried for the
    ``best`` recipe on its validation split, not adopted: the docs' Experiments page).
    """

    features: Sequence[int] = (32, 32, 64, 64)
    pool_after: Sequence[bool] = (False, True, False, True)
    kernel_size: int = 3
    conv_dropout: float = 0.25
    dense: int = 256
    dense_dropout: float = 0.4
    num_classes: int = 10
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    impl: str = "auto"
    input_norm: tuple[float, float] | None = MNIST_MEAN_STD
    input_zoom: float = 1.0

    def __post_init__(self) -> None:
        _check_conv_net(self)
        if not self.input_zoom > 0:
            raise ValueError(f"input_zoom must be positive, got {self.input_zoom!r}")
        _check_rates(self, "bn_momentum")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = _standardize(center_zoom(jnp.asarray(x, dtype), self.input_zoom), self.input_norm)
        impl = CNN(impl=self.impl).impl_for(train)
        k = self.kernel_size

        def norm(name: str, y: jax.Array) -> jax.Array:
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                dtype=dtype, name=name)(y)

        for i, (f, pool) in enumerate(zip(self.features, self.pool_after)):
            if impl == "fast":
                w, b = fastconv.ConvParams(f, k, x.shape[-1], name=f"conv_{i}")()
                cfg = fastconv.layer_config("VALID", k, 2 if pool else 0)
                x = fastconv.conv_stack(x, [w.astype(dtype)], [b.astype(dtype)], [cfg])
            else:
                x = nn.Conv(f, (k, k), padding="VALID", dtype=dtype, name=f"conv_{i}")(x)
                x = Activation("relu", name=f"conv_act_{i}")(x)
                if pool:
                    x = MaxPool(2, name=f"pool_{i}")(x)
            x = norm(f"bn_{i}", x)
        x = Dropout(self.conv_dropout, deterministic=not train, name="conv_dropout")(x)
        x = Flatten(name="flatten")(x)
        x = nn.Dense(self.dense, dtype=dtype, name="dense_0")(x)
        x = norm("bn_dense", Activation("relu", name="dense_act_0")(x))
        x = Dropout(self.dense_dropout, deterministic=not train, name="dense_dropout_0")(x)
        x = nn.Dense(self.num_classes, dtype=dtype, name="dense_1")(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------

# name (one per names.MODELS) -> (class, preset fields).  "convnet" is keras.io's "Simple MNIST convnet"
# (Conv32 -> pool -> Conv64 -> pool -> Dropout .5 -> Dense 10; 34,826 params), the
# appendix's "conv -> ReLU -> max-pool, repeated" with no hidden dense layer.
_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "cnn": (CNN, {}),
    "convnet": (CNN, {"pool_after": (True, True), "conv_dropout": 0.5, "dense": ()}),
    # tuomaso/train_mnist_fast's net: Conv5x5-24, pool, ReLU, Conv3x3-32, pool, ReLU,
    # Dense 256, ReLU, Dense 10 (ReLU and max-pool commute), standardised inputs, PyTorch's
    # initialisation (its one-epoch recipe is tuned to it and scores higher on a validation
    # split with it than with Flax's LeCun normal: the docs' Models page).
    "smallcnn": (CNN, {"features": (24, 32), "kernel_size": (5, 3), "pool_after": (True, True),
                       "conv_dropout": 0.0, "dense": (256,), "dense_dropout": 0.0,
                       "input_norm": MNIST_MEAN_STD, "weight_init": "torch"}),
    "bncnn": (BNCNN, {}),
}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset (one of :data:`MODEL_NAMES`: mlp, cnn, convnet, smallcnn, bncnn) with its
    defaults, fields overridden by ``overrides`` (e.g. ``create_model("cnn", impl="xla")``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    cls, preset = _PRESETS[key]
    check_field_types(cls, overrides)
    return cls(**{**preset, **overrides})


def check_field_types(cls: Any, values: dict[str, Any],
                      hints: dict[str, Any] | None = None) -> None:
    """Raise TypeError for a value that does not fit its field's annotation (or its entry
    in ``hints``, e.g. a constructor's), so that a bad ``--model-args`` fails here, not as a
    traceback from deep inside the first trace. Annotations that cannot be resolved, or
    that this does not know, are not checked."""
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - a user's module may annotate with unimported names
            return
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise TypeError(f"{cls.__name__}.{name} must be {_type_name(hints[name])}, "
                            f"got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """isinstance for the annotations of the presets' fields (JSON's lists as sequences,
    ints as floats, bools as neither ints nor floats); anything else passes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        number = numbers.Real if hint is float else numbers.Integral
        return isinstance(value, number) and not isinstance(value, (bool, np.bool_))
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not ...:  # tuple[float, float]
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    return True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, collections.abc.Sequence):
        fixed = origin is tuple and args and args[-1] is not ...
        return f"a list of {f'{len(args)} ' if fixed else ''}{_type_name(args[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
