"""The two Keras-tutorial MNIST models in Flax linen, plus helpers.

* :class:`MLP` -- ``Dense(784) -> Dropout(0.4) -> ReLU -> Dense(10)``.
* :class:`CNN` -- the classic Keras MNIST convnet (or the tutorial appendix's
  "conv -> ReLU -> max-pool, repeated" variant via ``pool_after``; the preset
  ``create_model("convnet")`` is keras.io's small "Simple MNIST convnet" built so).

Both return **logits** (float32); softmax is applied by the loss
(``optax.softmax_cross_entropy*``) or by prediction code.

The CNN has two numerically equivalent implementations sharing one parameter
tree: ``impl="xla"`` (``nn.Conv`` / ``nn.max_pool``) and ``impl="fast"``, tuned
for XLA's CPU backend, where the gradients of ``conv`` and of ``max_pool``
(select-and-scatter) are slow and every MB of a step's temporaries costs page
faults on every call.  The fast path runs the whole conv stack (conv -> ReLU
[-> max-pool] per layer) as one ``jax.custom_vjp``: each conv is im2col (shifted
slices concatenated) + one matmul (the forward of a one-channel layer is XLA's
conv; a pooled layer computes only the outputs its pool reads), pooling is a
reshape + max that also records an int8 "which element won" code (gradient to
the first maximum, exactly like select-and-scatter), and the batch is processed
in chunks of ~4 MB of im2col so temporaries stay small; the backward recomputes the earlier layers per chunk
instead of storing them.  See ``benchmarks/step_variants.py`` for timings.
``impl="auto"`` picks "fast" to train on the CPU backend and "xla" elsewhere,
including inference on the CPU, where XLA's own convolution runs the forward
pass about twice as fast as im2col (10,000 test images: 0.6 s vs 1.1 s).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from mnist_jax.dropout import Dropout  # nn.Dropout with a cheap hashed mask

__all__ = [
    "MLP",
    "CNN",
    "ACTIVATIONS",
    "MODEL_NAMES",
    "create_model",
    "count_params",
    "summary",
    "flops_per_example",
]

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

_IMPLS = ("auto", "xla", "fast")
_FAST_PADDINGS = ("VALID", "SAME")

# Target size (bytes) of one batch chunk's im2col buffer in the fast conv.
_FAST_CHUNK_BYTES = 4 << 20
# Fuse all conv layers into one custom-VJP stack (recomputing the early layers'
# activations per chunk in the backward) rather than one per layer.
_FAST_FUSE_STACK = True
# Layers with at most this many input channels run their forward through XLA's conv:
# im2col of a 1-channel image is a 9x copy feeding a K=9 matmul, which XLA's conv beats
# (convnet step 10.7 -> 10.0 ms; the default CNN unchanged).  Gradients stay im2col.
_XLA_CONV_MAX_CIN = 1


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
# Fast conv(+ReLU)(+max-pool) block for the CPU backend
# --------------------------------------------------------------------------


def _im2col(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(n,H,W,C) -> (n,H-kh+1,W-kw+1,kh*kw*C), patch order (i, j, c)."""
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    if kh == kw == 1:
        return x
    return jnp.concatenate(
        [x[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)], axis=-1
    )


def _col2im(d: jax.Array, kh: int, kw: int, c: int) -> jax.Array:
    """Adjoint of :func:`_im2col`: (n,Ho,Wo,kh*kw*c) -> (n,Ho+kh-1,Wo+kw-1,c)."""
    out = None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            part = jnp.pad(
                d[..., k * c : (k + 1) * c],
                ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)),
            )
            out = part if out is None else out + part
    return out


def _window_index(p: int) -> jax.Array:
    return (np.arange(p)[:, None] * p + np.arange(p)[None, :]).reshape(1, 1, p, 1, p, 1)


def _relu_pool_fwd(z: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
    """max_pool(relu(z)) plus, per output, the window index XLA's
    select-and-scatter would route the gradient to (first maximum), or p*p
    where the maximum is <= 0 (ReLU kills the gradient).  ``z``'s height and
    width are multiples of ``p`` (:func:`_pooled_input` crops the rest)."""
    n, h, w, c = z.shape
    ho, wo = h // p, w // p
    z6 = z.reshape(n, ho, p, wo, p, c)
    m = z6.max(axis=(2, 4))
    idx = jnp.where(z6 == m[:, :, None, :, None, :], _window_index(p), p * p).min(axis=(2, 4))
    code = jnp.where(m > 0, idx, p * p).astype(jnp.int8 if p * p < 127 else jnp.int32)
    return jnp.maximum(m, 0), code


def _relu_pool_bwd(code: jax.Array, g: jax.Array, p: int) -> jax.Array:
    n, ho, wo, c = g.shape
    return jnp.where(
        code[:, :, None, :, None, :] == _window_index(p), g[:, :, None, :, None, :], 0
    ).reshape(n, ho * p, wo * p, c)


def _chunk_size(n: int, per_example_bytes: int) -> int:
    return max(1, min(n, _FAST_CHUNK_BYTES // max(per_example_bytes, 1)))


def _map_chunks(fn: Callable, n: int, chunk: int, xs: tuple, init: Any = None):
    """Apply ``fn(carry, *xs_chunk) -> (carry, ys_chunk)`` over batch chunks of
    ``xs`` (a scan over the full chunks, then one call on the remainder);
    returns ``(carry, ys)`` with ``ys`` re-assembled along the batch axis."""
    nfull, rem = divmod(n, chunk)
    if nfull <= 1 and rem == 0:
        return fn(init, *xs)
    head = tuple(a[: nfull * chunk].reshape(nfull, chunk, *a.shape[1:]) for a in xs)
    carry, ys = lax.scan(lambda c, a: fn(c, *a), init, head)
    ys = jax.tree.map(lambda y: y.reshape(nfull * chunk, *y.shape[2:]), ys)
    if rem:
        carry, tail = fn(carry, *(a[nfull * chunk :] for a in xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
    return carry, ys


# A layer of the stack: (pads ((lo, hi), (lo, hi)), pool size or 0).
_LayerCfg = tuple[tuple[tuple[int, int], tuple[int, int]], int]


def _pad(x: jax.Array, pads) -> jax.Array:
    return jnp.pad(x, ((0, 0), *pads, (0, 0))) if any(map(any, pads)) else x


def _pooled_input(xp: jax.Array, kh: int, kw: int, pool: int) -> jax.Array:
    """The part of the (padded) input that the pooled outputs depend on: a VALID
    pool drops the last conv row/column when their count is odd, so neither that
    output nor the input rows/columns only it reads need computing (11x11 -> 10x10
    in the convnet's second layer: 17 % of its FLOPs)."""
    if not pool:
        return xp
    h = (xp.shape[1] - kh + 1) // pool * pool + kh - 1
    w = (xp.shape[2] - kw + 1) // pool * pool + kw - 1
    return xp[:, :h, :w]


def _layer_fwd(x, w, b, cfg: _LayerCfg):
    """relu(conv(x)+b) [max-pooled]; returns (output, aux for the backward):
    aux is the int8 pool code, or the output itself when not pooled."""
    (pads, pool), (kh, kw, ci, co) = cfg, w.shape
    xp = _pooled_input(_pad(x, pads), kh, kw, pool)
    if ci <= _XLA_CONV_MAX_CIN:
        z = lax.conv_general_dilated(xp, w, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    else:
        z = jnp.dot(_im2col(xp, kh, kw), w.reshape(kh * kw * ci, co)) + b
    if pool:
        return _relu_pool_fwd(z, pool)
    a = jnp.maximum(z, 0)
    return a, a


def _layer_bwd(x, w, cfg: _LayerCfg, aux, g):
    """(dx, dw, db) of :func:`_layer_fwd` given its input, aux and output cotangent."""
    (pads, pool), (kh, kw, ci, co) = cfg, w.shape
    full = _pad(x, pads)
    xp = _pooled_input(full, kh, kw, pool)
    if pool:
        dz = _relu_pool_bwd(aux, g, pool)
    else:
        dz = jnp.where(aux > 0, g, 0)
    dw = jnp.tensordot(_im2col(xp, kh, kw), dz, axes=((0, 1, 2), (0, 1, 2)),
                       preferred_element_type=jnp.float32)
    db = dz.sum(axis=(0, 1, 2), dtype=jnp.float32)
    dx = _col2im(jnp.dot(dz, w.reshape(kh * kw * ci, co).T), kh, kw, ci)
    if dx.shape != full.shape:  # rows/columns only the dropped outputs read: zero gradient
        dx = jnp.pad(dx, ((0, 0), (0, full.shape[1] - dx.shape[1]),
                          (0, full.shape[2] - dx.shape[2]), (0, 0)))
    (t, _), (l, _) = pads
    return dx[:, t : t + x.shape[1], l : l + x.shape[2]], dw, db


def _stack_chunk(x: jax.Array, w: Sequence[tuple[int, ...]], cfg: tuple[_LayerCfg, ...]) -> int:
    """Batch chunk for the stack: the largest im2col buffer ~ _FAST_CHUNK_BYTES."""
    per_example, h, wd, c = 0, x.shape[1], x.shape[2], x.shape[3]
    for (pads, pool), (kh, kw, _, co) in zip(cfg, w):
        ho, wo = h + sum(pads[0]) - kh + 1, wd + sum(pads[1]) - kw + 1
        per_example = max(per_example, ho * wo * kh * kw * c)
        h, wd, c = (ho // pool, wo // pool, co) if pool else (ho, wo, co)
    return _chunk_size(x.shape[0], per_example * x.dtype.itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_stack(x: jax.Array, ws: tuple, bs: tuple, cfg: tuple[_LayerCfg, ...]) -> jax.Array:
    """``[max_pool](relu(conv(x, w) + b))`` for each layer, NHWC/HWIO, stride 1."""
    return _conv_stack_fwd(x, ws, bs, cfg)[0]


def _conv_stack_fwd(x, ws, bs, cfg):
    def body(_, xc):
        aux = None
        for w, b, c in zip(ws, bs, cfg):
            xc, aux = _layer_fwd(xc, w, b, c)
        return None, (xc, aux)

    chunk = _stack_chunk(x, [w.shape for w in ws], cfg)
    _, (out, aux) = _map_chunks(body, x.shape[0], chunk, (x,))
    return out, (x, ws, bs, aux)


def _conv_stack_bwd(cfg, res, g):
    """Per chunk: recompute the inputs of all layers (all but the last layer's
    forward again, cheap for the first convs), then backpropagate."""
    x, ws, bs, aux_last = res

    def body(carry, xc, auxc, gc):
        ins, auxs = [xc], []
        for w, b, c in zip(ws[:-1], bs[:-1], cfg[:-1]):
            out, aux = _layer_fwd(ins[-1], w, b, c)
            ins.append(out)
            auxs.append(aux)
        auxs.append(auxc)
        dws, dbs = list(carry[0]), list(carry[1])
        for i in reversed(range(len(ws))):
            gc, dw, db = _layer_bwd(ins[i], ws[i], cfg[i], auxs[i], gc)
            dws[i] = dws[i] + dw.reshape(ws[i].shape)
            dbs[i] = dbs[i] + db
        return (tuple(dws), tuple(dbs)), gc

    init = (tuple(jnp.zeros(w.shape, jnp.float32) for w in ws),
            tuple(jnp.zeros(b.shape, jnp.float32) for b in bs))
    chunk = _stack_chunk(x, [w.shape for w in ws], cfg)
    (dws, dbs), dx = _map_chunks(body, x.shape[0], chunk, (x, aux_last, g), init)
    return (dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)),
            tuple(d.astype(b.dtype) for d, b in zip(dbs, bs)))


_conv_stack.defvjp(_conv_stack_fwd, _conv_stack_bwd)


def _same_pads(k: int) -> tuple[int, int]:
    return ((k - 1) // 2, k - 1 - (k - 1) // 2)


class _ConvParams(nn.Module):
    """Declares ``nn.Conv``'s parameters (same names, shapes, initialisers)."""

    features: int
    kernel_size: int
    in_features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, self.in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


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
    Input ``(B,28,28)`` or ``(B,28,28,1)``; returns float32 logits.

    ``impl``: "xla" (``nn.Conv``/``nn.max_pool``), "fast" (fused custom-VJP
    im2col blocks, best to train on CPU; falls back to "xla" for paddings other
    than VALID/SAME) or "auto" ("fast" when training on the CPU backend, else
    "xla": inference on the CPU is faster with XLA's convolution).
    Both use the same parameter tree.
    """

    features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    pool_after: Sequence[bool] | None = None
    pool_size: int = 2
    conv_dropout: float = 0.25
    dense: Sequence[int] = (128,)
    dense_dropout: float = 0.5
    num_classes: int = 10
    padding: str = "VALID"
    dtype: Any = jnp.float32
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.impl not in _IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; choose one of {list(_IMPLS)}")
        if self.pool_after is not None and len(self.pool_after) != len(self.features):
            raise ValueError("pool_after must have one entry per conv layer")
        super().__post_init__()

    @property
    def resolved_impl(self) -> str:
        """The implementation training uses: "xla" or "fast"."""
        return self.impl_for(train=True)

    def impl_for(self, train: bool) -> str:
        """The implementation a call with this ``train`` flag uses: "xla" or "fast"."""
        impl = self.impl
        if impl == "auto":
            impl = "fast" if train and jax.default_backend() == "cpu" else "xla"
        if impl == "fast" and self.padding.upper() not in _FAST_PADDINGS:
            impl = "xla"
        return impl

    def _pools(self) -> list[bool]:
        if self.pool_after is None:
            return [i == len(self.features) - 1 for i in range(len(self.features))]
        return [bool(p) for p in self.pool_after]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = jnp.asarray(x, dtype)
        if x.ndim == 3:
            x = x[..., None]
        k = self.kernel_size
        if self.impl_for(train) == "fast":
            ws, bs, cfg = [], [], []
            pads = ((0, 0), (0, 0)) if self.padding.upper() == "VALID" else (_same_pads(k),) * 2
            cin = x.shape[-1]
            for i, (f, pool) in enumerate(zip(self.features, self._pools())):
                w, b = _ConvParams(f, k, cin, name=f"conv_{i}")()
                ws.append(w.astype(dtype))
                bs.append(b.astype(dtype))
                cfg.append((pads, self.pool_size if pool else 0))
                cin = f
            if _FAST_FUSE_STACK:
                x = _conv_stack(x, tuple(ws), tuple(bs), tuple(cfg))
            else:
                for w, b, c in zip(ws, bs, cfg):
                    x = _conv_stack(x, (w,), (b,), (c,))
        else:
            for i, (f, pool) in enumerate(zip(self.features, self._pools())):
                x = nn.Conv(f, (k, k), padding=self.padding, dtype=dtype, name=f"conv_{i}")(x)
                x = Activation("relu", name=f"conv_act_{i}")(x)
                if pool:
                    x = MaxPool(self.pool_size, name=f"pool_{i}")(x)
        x = Dropout(self.conv_dropout, deterministic=not train, name="conv_dropout")(x)
        x = Flatten(name="flatten")(x)
        for i, width in enumerate(self.dense):
            x = nn.Dense(width, dtype=dtype, name=f"dense_{i}")(x)
            x = Activation("relu", name=f"dense_act_{i}")(x)
            x = Dropout(self.dense_dropout, deterministic=not train, name=f"dense_dropout_{i}")(x)
        x = nn.Dense(self.num_classes, dtype=dtype, name=f"dense_{len(self.dense)}")(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

# name -> (class, preset fields).  "convnet" is keras.io's "Simple MNIST convnet"
# (Conv32 -> pool -> Conv64 -> pool -> Dropout .5 -> Dense 10; 34,826 params), the
# appendix's "conv -> ReLU -> max-pool, repeated" with no hidden dense layer.
_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "cnn": (CNN, {}),
    "convnet": (CNN, {"pool_after": (True, True), "conv_dropout": 0.5, "dense": ()}),
}
MODEL_NAMES = tuple(_PRESETS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build ``"mlp"``, ``"cnn"`` or ``"convnet"`` (see :data:`MODEL_NAMES`) with its
    defaults, fields overridden by ``overrides`` (e.g. ``create_model("cnn", impl="xla")``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    cls, preset = _PRESETS[key]
    return cls(**{**preset, **overrides})


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(math.prod(np.shape(a)) for a in jax.tree.leaves(params)))


class _Layer:
    """One traced top-level layer call: name, type, input/output shapes, params."""

    def __init__(self, name: str, kind: str, in_shape: tuple, out_shape: tuple, n_params: int,
                 kernel_shape: tuple | None):
        self.name, self.kind = name, kind
        self.in_shape, self.out_shape = in_shape, out_shape
        self.n_params, self.kernel_shape = n_params, kernel_shape


def _trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[_Layer], Any]:
    """Shape-only trace of ``model`` (the "xla" variant for a CNN, so that ReLU
    and pooling appear as layers) recording each top-level submodule call."""
    if isinstance(model, CNN):
        model = model.clone(impl="xla")
    calls: list[tuple[str, str, tuple, tuple]] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and len(mod.scope.path) == 1:
            calls.append((mod.name, type(mod).__name__, tuple(args[0].shape), tuple(out.shape)))
        return out

    def init(x):
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.key(0), x, train=False)["params"]

    params = jax.eval_shape(init, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    layers = []
    for name, kind, ins, outs in calls:
        p = params.get(name, {})
        kernel = tuple(p["kernel"].shape) if "kernel" in p else None
        layers.append(_Layer(name, kind, ins, outs, count_params(p), kernel))
    return layers, params


def summary(model: nn.Module, input_shape: Sequence[int] = (1, 28, 28)) -> str:
    """A Keras ``model.summary()``-style table: layer (type), output shape
    (batch shown as ``None``) and parameter count, then the totals."""
    layers, params = _trace(model, input_shape)
    rule = "=" * 66
    title = f'Model: "{type(model).__name__}"'
    if isinstance(model, CNN):
        title += f" (impl={model.resolved_impl})"
    lines = [title, f"{'Layer (type)':<32}{'Output Shape':<22}{'Param #':>12}", rule]
    for layer in layers:
        shape = "(None, " + ", ".join(str(d) for d in layer.out_shape[1:]) + ")"
        lines.append(f"{layer.name + ' (' + layer.kind + ')':<32}{shape:<22}{layer.n_params:>12,}")
    total = count_params(params)
    lines += [rule, f"Total params: {total:,}", f"Trainable params: {total:,}",
              "Non-trainable params: 0"]
    return "\n".join(lines)


def flops_per_example(model: nn.Module, input_shape: Sequence[int] = (1, 28, 28)) -> dict[str, int]:
    """Matmul FLOPs per example, counted from the layer shapes as 2*MACs.

    ``forward``: every Dense (in*out) and Conv (Ho*Wo*Cout*kh*kw*Cin) layer.
    ``train``: forward + weight gradient (same count again) + input gradient
    (same again) for every such layer except the first, whose input needs no
    gradient.  Biases, activations, pooling, dropout, loss and optimizer are
    ignored (well under 1%).
    """
    layers, _ = _trace(model, input_shape)
    fwd = train = 0
    first = True
    for layer in layers:
        if layer.kernel_shape is None:
            continue
        if layer.kind == "Conv":
            macs = math.prod(layer.out_shape[1:]) * math.prod(layer.kernel_shape[:-1])
        else:
            macs = math.prod(layer.out_shape[1:-1]) * math.prod(layer.kernel_shape)
        fwd += 2 * macs
        train += (4 if first else 6) * macs
        first = False
    return {"forward": fwd, "train": train}
