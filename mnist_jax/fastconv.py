"""The fast CPU convolution stack behind ``CNN(impl="fast")``.

XLA's CPU backend is slow at the gradients of ``conv`` and of ``max_pool``
(select-and-scatter), and every MB of a step's temporaries costs page faults on
every call.  :func:`conv_stack` therefore runs the whole conv stack (conv -> ReLU
[-> max-pool] per layer) as one ``jax.custom_vjp``:

* each conv is im2col (shifted slices) + one matmul; a pooled layer computes only
  the outputs its pool reads;
* pooling is a reshape + max that also records an int8 "which element won" code
  (gradient to the first maximum, exactly like select-and-scatter);
* the batch is processed in equal (zero-padded) chunks of ~:data:`CHUNK_BYTES` of
  im2col so temporaries stay small;
* the stack's input gradient is computed only when the input is differentiated
  (``symbolic_zeros``): not for images;
* two layouts: NHWC (the forward of a one-channel layer is XLA's conv; the backward
  recomputes the earlier layers per chunk), and channel-major CNHW for stacks whose
  first layer has a large kernel (the speedrun net's 5x5): there every contraction is
  a matmul XLA:CPU runs without copying a transposed im2col, the first layer of a
  data input computes its outputs pool-window-major, and the backward keeps the small
  hidden activations instead of recomputing them.

It declares the same parameters as ``nn.Conv`` (:class:`ConvParams`), so the "fast"
and "xla" CNNs share one parameter tree.  See ``benchmarks/step_variants.py`` for
timings of these choices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

__all__ = ["PADDINGS", "ConvParams", "computes_channel_major", "layer_config", "conv_stack"]

PADDINGS = ("VALID", "SAME")
"""Paddings the fast path implements (a CNN with another falls back to XLA's conv)."""

# Target size (bytes) of one batch chunk's im2col buffer.
CHUNK_BYTES = 4 << 20
# Fuse all conv layers into one custom-VJP stack (recomputing or keeping the early
# layers' activations per chunk in the backward) rather than one per layer.
FUSE_STACK = True
# Layers with at most this many input channels run their forward through XLA's conv:
# im2col of a 1-channel image is a 9x copy feeding a K=9 matmul, which XLA's conv beats
# in the forward pass.  Gradients stay im2col.
XLA_CONV_MAX_CIN = 1
# Channel-major only: the backward keeps the hidden layers' outputs (and pool codes) when
# they take at most this many bytes per example, instead of recomputing them per chunk
# (the speedrun net's 17 KB: reading them back beats recomputing them).
STORE_MAX_BYTES = 32 << 10
# The stack computes in the channel-major layout (see _to_cm) when its first layer has at
# least this many kernel taps (kh*kw*cin); None: never.  Channel-major pays for a large
# first kernel (the speedrun net's 5x5) and costs for 3x3 first layers (K=9 matmuls,
# the default CNN and the convnet); the figures are in the docs' Benchmarks page.
CHANNEL_MAJOR_MIN_TAPS: int | None = 16
# Channel-major only: the first layer, when its input needs no gradient, orders its
# conv outputs by pool-window offset (pool = max over contiguous planes).
POOL_MAJOR_FIRST = True
# Channel-major only: col2im as in-place window updates of one buffer.
COL2IM_INPLACE = True

# A layer of the stack: (pads ((lo, hi), (lo, hi)), pool size or 0).
LayerCfg = tuple[tuple[tuple[int, int], tuple[int, int]], int]


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
    return max(1, min(n, CHUNK_BYTES // max(per_example_bytes, 1)))


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


def _layer_fwd(x, w, b, cfg: LayerCfg):
    """relu(conv(x)+b) [max-pooled]; returns (output, aux for the backward):
    aux is the int8 pool code, or the output itself when not pooled."""
    (pads, pool), (kh, kw, ci, co) = cfg, w.shape
    xp = _pooled_input(_pad(x, pads), kh, kw, pool)
    if ci <= XLA_CONV_MAX_CIN:
        z = lax.conv_general_dilated(xp, w, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    else:
        z = jnp.dot(_im2col(xp, kh, kw), w.reshape(kh * kw * ci, co)) + b
    if pool:
        return _relu_pool_fwd(z, pool)
    a = jnp.maximum(z, 0)
    return a, a


def _layer_bwd(x, w, cfg: LayerCfg, aux, g, need_dx: bool = True):
    """(dx, dw, db) of :func:`_layer_fwd` given its input, aux and output cotangent
    (dx is None when not ``need_dx``: the input is data)."""
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
    if not need_dx:
        return None, dw, db
    dx = _col2im(jnp.dot(dz, w.reshape(kh * kw * ci, co).T), kh, kw, ci)
    if dx.shape != full.shape:  # rows/columns only the dropped outputs read: zero gradient
        dx = jnp.pad(dx, ((0, 0), (0, full.shape[1] - dx.shape[1]),
                          (0, full.shape[2] - dx.shape[2]), (0, 0)))
    (t, _), (l, _) = pads
    return dx[:, t : t + x.shape[1], l : l + x.shape[2]], dw, db


# ---- channel-major (C, N, H, W) layers --------------------------------------------
# In CNHW every contraction is one XLA:CPU runs as a plain matmul: the forward
# W^T (co, K) @ cols (K, rows), the weight gradient cols (K, rows) . dz (co, rows) over
# rows, the input gradient W (K, co) @ dz (co, rows); and im2col stacks whole shifted
# slices instead of interleaving them channel by channel.  The NHWC layers above make
# XLA copy a transposed im2col for every weight gradient.


def _to_cm(x: jax.Array) -> jax.Array:
    """NHWC -> CNHW (a reshape for one channel)."""
    return x.reshape(1, *x.shape[:3]) if x.shape[-1] == 1 else jnp.moveaxis(x, -1, 0)


def _from_cm(x: jax.Array) -> jax.Array:
    """CNHW -> NHWC."""
    return x.reshape(*x.shape[1:], 1) if x.shape[0] == 1 else jnp.moveaxis(x, 0, -1)


def _pad_cm(x: jax.Array, pads) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, 0), *pads)) if any(map(any, pads)) else x


def _pooled_input_cm(xp: jax.Array, kh: int, kw: int, pool: int) -> jax.Array:
    """:func:`_pooled_input` for CNHW."""
    if not pool:
        return xp
    h = (xp.shape[2] - kh + 1) // pool * pool + kh - 1
    w = (xp.shape[3] - kw + 1) // pool * pool + kw - 1
    return xp[:, :, :h, :w]


def _cols_cm(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(C,n,H,W) -> (kh*kw*C, n*Ho*Wo), rows of patch order (i, j, c) as HWIO kernels."""
    c, n, h, w = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    if kh == kw == 1:
        return x.reshape(c, n * h * w)
    return jnp.stack([x[:, :, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)]
                     ).reshape(kh * kw * c, n * ho * wo)


def _col2im_cm(d: jax.Array, kh: int, kw: int, shape) -> jax.Array:
    """Adjoint of :func:`_cols_cm`: (kh*kw*C, n*Ho*Wo) -> (C, n, Ho+kh-1, Wo+kw-1)."""
    c, n, ho, wo = shape
    d = d.reshape(kh * kw, c, n, ho, wo)
    if COL2IM_INPLACE:
        # in-place window updates of one buffer: XLA otherwise materialises every padded
        # term and re-fuses their sum into each consumer (p*p times under a pool scatter)
        out = jnp.zeros((c, n, ho + kh - 1, wo + kw - 1), d.dtype)
        for i in range(kh):
            for j in range(kw):
                out = out.at[:, :, i : i + ho, j : j + wo].add(d[i * kw + j])
        return out
    out = None
    for i in range(kh):
        for j in range(kw):
            part = jnp.pad(d[i * kw + j], ((0, 0), (0, 0), (i, kh - 1 - i), (j, kw - 1 - j)))
            out = part if out is None else out + part
    return out


def _window_index_cm(p: int) -> jax.Array:
    return (np.arange(p)[:, None] * p + np.arange(p)[None, :]).reshape(1, 1, 1, p, 1, p)


def _relu_pool_fwd_cm(z: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_relu_pool_fwd` for CNHW."""
    c, n, h, w = z.shape
    z6 = z.reshape(c, n, h // p, p, w // p, p)
    m = z6.max(axis=(3, 5))
    idx = jnp.where(z6 == m[:, :, :, None, :, None], _window_index_cm(p), p * p).min(axis=(3, 5))
    code = jnp.where(m > 0, idx, p * p).astype(jnp.int8 if p * p < 127 else jnp.int32)
    return jnp.maximum(m, 0), code


def _relu_pool_bwd_cm(code: jax.Array, g: jax.Array, p: int) -> jax.Array:
    c, n, ho, wo = g.shape
    return jnp.where(code[:, :, :, None, :, None] == _window_index_cm(p),
                     g[:, :, :, None, :, None], 0).reshape(c, n, ho * p, wo * p)


def _cols_pm(x: jax.Array, kh: int, kw: int, p: int) -> jax.Array:
    """:func:`_cols_cm` with the output positions in pool-major order: (C,n,H,W) ->
    (kh*kw*C, p*p*n*Ho/p*Wo/p), rows (window offset, n, pooled row, pooled column)."""
    c, n, h, w = x.shape
    ho, wo = (h - kh + 1) // p, (w - kw + 1) // p
    return jnp.stack([
        jnp.stack([x[:, :, di + i : di + i + p * (ho - 1) + 1 : p,
                     dj + j : dj + j + p * (wo - 1) + 1 : p]
                   for di in range(p) for dj in range(p)], axis=1)
        for i in range(kh) for j in range(kw)]).reshape(kh * kw * c, p * p * n * ho * wo)


def _layer_fwd_cm(x, w, b, cfg: LayerCfg, pool_major: bool = False):
    """:func:`_layer_fwd` on a CNHW input; output and aux CNHW.  ``pool_major``
    (pooled layers): compute the conv outputs ordered by window offset first, so that
    the pool is a max over p*p contiguous planes (its input gradient is not implemented)."""
    (pads, pool), (kh, kw, ci, co) = cfg, w.shape
    xp = _pooled_input_cm(_pad_cm(x, pads), kh, kw, pool)
    n, ho, wo = xp.shape[1], xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    wt = w.reshape(kh * kw * ci, co).T
    if pool and pool_major:
        z = (jnp.dot(wt, _cols_pm(xp, kh, kw, pool)) + b[:, None]).reshape(
            co, pool * pool, n, ho // pool, wo // pool)
        m = z.max(axis=1)
        idx = jnp.where(z == m[:, None], np.arange(pool * pool).reshape(1, -1, 1, 1, 1),
                        pool * pool).min(axis=1)
        code = jnp.where(m > 0, idx, pool * pool).astype(jnp.int8 if pool * pool < 127
                                                         else jnp.int32)
        return jnp.maximum(m, 0), code
    z = (jnp.dot(wt, _cols_cm(xp, kh, kw)) + b[:, None]).reshape(co, n, ho, wo)
    if pool:
        return _relu_pool_fwd_cm(z, pool)
    a = jnp.maximum(z, 0)
    return a, a


def _layer_bwd_cm(x, w, cfg: LayerCfg, aux, g, need_dx: bool = True, pool_major: bool = False):
    """:func:`_layer_bwd` on CNHW input, aux and cotangent; dx CNHW (None without need_dx;
    ``pool_major`` as in :func:`_layer_fwd_cm`, only without need_dx)."""
    (pads, pool), (kh, kw, ci, co) = cfg, w.shape
    full = _pad_cm(x, pads)
    xp = _pooled_input_cm(full, kh, kw, pool)
    if pool and pool_major:
        assert not need_dx
        dz = jnp.where(aux[:, None] == np.arange(pool * pool).reshape(1, -1, 1, 1, 1),
                       g[:, None], 0)
        cols = _cols_pm(xp, kh, kw, pool)
    else:
        dz = _relu_pool_bwd_cm(aux, g, pool) if pool else jnp.where(aux > 0, g, 0)
        cols = _cols_cm(xp, kh, kw)
    dz2 = dz.reshape(co, -1)
    dw = lax.dot_general(cols, dz2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if pool:  # at the pooled resolution: XLA would fuse the p*p-plane select in again
        db = jnp.where(aux < pool * pool, g, 0).sum(axis=(1, 2, 3), dtype=jnp.float32)
    else:
        db = dz2.sum(axis=1, dtype=jnp.float32)
    if not need_dx:
        return None, dw, db
    dx = _col2im_cm(jnp.dot(w.reshape(kh * kw * ci, co), dz2), kh, kw, (ci, *dz.shape[1:]))
    if dx.shape != full.shape:  # rows/columns only the dropped outputs read: zero gradient
        dx = jnp.pad(dx, ((0, 0), (0, 0), (0, full.shape[2] - dx.shape[2]),
                          (0, full.shape[3] - dx.shape[3])))
    (t, _), (l, _) = pads
    return dx[:, :, t : t + x.shape[2], l : l + x.shape[3]], dw, db


def _stack_chunk(x: jax.Array, w: Sequence[tuple[int, ...]], cfg: tuple[LayerCfg, ...]) -> int:
    """Batch chunk for the stack: the largest im2col buffer ~ CHUNK_BYTES."""
    per_example, h, wd, c = 0, x.shape[1], x.shape[2], x.shape[3]
    for (pads, pool), (kh, kw, _, co) in zip(cfg, w):
        ho, wo = h + sum(pads[0]) - kh + 1, wd + sum(pads[1]) - kw + 1
        per_example = max(per_example, ho * wo * kh * kw * c)
        h, wd, c = (ho // pool, wo // pool, co) if pool else (ho, wo, co)
    return _chunk_size(x.shape[0], per_example * x.dtype.itemsize)


def _stored_bytes(x: jax.Array, w: Sequence[tuple[int, ...]], cfg: tuple[LayerCfg, ...]) -> int:
    """Bytes per example of the hidden layers' outputs and pool codes (what the
    backward would keep instead of recomputing)."""
    total, h, wd = 0, x.shape[1], x.shape[2]
    for (pads, pool), (kh, kw, _, co) in list(zip(cfg, w))[:-1]:
        h, wd = h + sum(pads[0]) - kh + 1, wd + sum(pads[1]) - kw + 1
        if pool:
            h, wd = h // pool, wd // pool
        total += h * wd * co * (x.dtype.itemsize + (1 if pool else 0))
    return total


def computes_channel_major(kernel_size: int, in_channels: int) -> bool:
    """Whether a stack whose first layer has this square kernel and input channel count
    computes in the channel-major layout (the speedrun net's 5x5 on one channel: yes)."""
    taps = kernel_size * kernel_size * in_channels
    return CHANNEL_MAJOR_MIN_TAPS is not None and taps >= CHANNEL_MAJOR_MIN_TAPS


def _channel_major(ws: Sequence[jax.Array]) -> bool:
    k, _, ci, _ = ws[0].shape  # square kernels (ConvParams)
    return computes_channel_major(k, ci)


def _layout(channel_major: bool):
    """(to, back, layer_fwd, layer_bwd) of the layout the stack computes in."""
    if channel_major:
        return _to_cm, _from_cm, _layer_fwd_cm, _layer_bwd_cm
    same = lambda a: a
    return (same, same, lambda *a, pool_major=False: _layer_fwd(*a),
            lambda *a, need_dx=True, pool_major=False: _layer_bwd(*a, need_dx))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices the forward makes for the backward (carried in the residuals)."""

    need_dx: bool  # the stack's input is differentiated (not data)
    stored: bool  # the hidden layers' outputs are kept, not recomputed
    channel_major: bool  # the layers compute in CNHW

    @property
    def first_pool_major(self) -> bool:
        """The first layer computes pool-major (see :func:`_layer_fwd_cm`)."""
        return self.channel_major and POOL_MAJOR_FIRST and not self.need_dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_stack(x: jax.Array, ws: tuple, bs: tuple, cfg: tuple[LayerCfg, ...]) -> jax.Array:
    """``[max_pool](relu(conv(x, w) + b))`` for each layer, NHWC/HWIO, stride 1."""
    return _stack_forward(x, ws, bs, cfg, _Plan(False, False, _channel_major(ws)))[0]


def _chunks(x: jax.Array, ws: tuple, cfg: tuple[LayerCfg, ...]) -> tuple[int, int]:
    """(number, size) of equal batch chunks of ~CHUNK_BYTES of im2col covering ``x``."""
    n = x.shape[0]
    num = -(-n // _stack_chunk(x, [w.shape for w in ws], cfg))
    return num, -(-n // num)


def _split(a: jax.Array, num: int, size: int) -> jax.Array:
    """(n, ...) -> (num, size, ...), zero-padded: a padded example has zero input and
    zero cotangent, so it adds nothing to any gradient."""
    pad = num * size - a.shape[0]
    if pad:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(num, size, *a.shape[1:])


def _merge(a: jax.Array, n: int) -> jax.Array:
    return a.reshape(-1, *a.shape[2:])[:n]


def _scan(fn: Callable, init: Any, xs: tuple, num: int):
    """``lax.scan`` of ``fn(carry, *x) -> (carry, y)`` over the leading axis of ``xs``
    (a plain call for a single chunk)."""
    if num == 1:
        carry, ys = fn(init, *jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], ys)
    return lax.scan(lambda c, a: fn(c, *a), init, xs)


def _stack_forward(x, ws, bs, cfg, plan: _Plan):
    """The stack's output and, per chunk (in the layers' layout), its input, the last
    layer's aux and (when ``store``) every hidden layer's output and aux."""
    to, back, layer_fwd, _ = _layout(plan.channel_major)
    num, size = _chunks(x, ws, cfg)
    xs = _split(x, num, size)

    def body(_, xc):
        xc, hidden = to(xc), []
        for i, (w, b, c) in enumerate(zip(ws, bs, cfg)):
            xc, aux = layer_fwd(xc, w, b, c, pool_major=i == 0 and plan.first_pool_major)
            hidden.append((xc, aux))
        return None, (back(xc), aux, tuple(hidden[:-1]) if plan.stored else ())

    _, (out, aux, hidden) = _scan(body, None, (xs,), num)
    return _merge(out, x.shape[0]), (xs, aux, hidden)


def _conv_stack_fwd(x, ws, bs, cfg):
    # symbolic_zeros: each array arrives as CustomVJPPrimal(value, perturbed)
    need_dx = x.perturbed
    x, ws, bs = (jax.tree.map(lambda p: p.value, a, is_leaf=_is_primal) for a in (x, ws, bs))
    cm = _channel_major(ws)
    store = cm and _stored_bytes(x, [w.shape for w in ws], cfg) <= STORE_MAX_BYTES
    plan = _Plan(need_dx, store, cm)
    out, chunked = _stack_forward(x, ws, bs, cfg, plan)
    return out, (chunked, ws, bs, plan)


def _is_primal(p: Any) -> bool:
    return isinstance(p, jax.custom_derivatives.CustomVJPPrimal)


def _conv_stack_bwd(cfg, res, g):
    """Per chunk: take (or recompute) the inputs of all layers, then backpropagate."""
    (xs, aux_last, hidden), ws, bs, plan = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the output is unused
        g = jnp.zeros(g.shape, g.dtype)
    to, back, layer_fwd, layer_bwd = _layout(plan.channel_major)

    def body(carry, xc, auxc, gc, hiddenc):
        ins, auxs = [to(xc)], []
        if plan.stored:
            for out, aux in hiddenc:
                ins.append(out)
                auxs.append(aux)
        else:  # recompute (all but the last layer's forward again, cheap for the first convs)
            for i, (w, b, c) in enumerate(zip(ws[:-1], bs[:-1], cfg[:-1])):
                out, aux = layer_fwd(ins[-1], w, b, c,
                                     pool_major=i == 0 and plan.first_pool_major)
                ins.append(out)
                auxs.append(aux)
        auxs.append(auxc)
        gc = to(gc)
        dws, dbs = list(carry[0]), list(carry[1])
        for i in reversed(range(len(ws))):
            gc, dw, db = layer_bwd(ins[i], ws[i], cfg[i], auxs[i], gc,
                                   need_dx=i > 0 or plan.need_dx,
                                   pool_major=i == 0 and plan.first_pool_major)
            dws[i] = dws[i] + dw.reshape(ws[i].shape)
            dbs[i] = dbs[i] + db
        return (tuple(dws), tuple(dbs)), (back(gc) if plan.need_dx else ())

    init = (tuple(jnp.zeros(w.shape, jnp.float32) for w in ws),
            tuple(jnp.zeros(b.shape, jnp.float32) for b in bs))
    num, size = xs.shape[:2]
    (dws, dbs), dx = _scan(body, init, (xs, aux_last, _split(g, num, size), hidden), num)
    return (_merge(dx, g.shape[0]) if plan.need_dx else None,
            tuple(d.astype(w.dtype) for d, w in zip(dws, ws)),
            tuple(d.astype(b.dtype) for d, b in zip(dbs, bs)))


_conv_stack.defvjp(_conv_stack_fwd, _conv_stack_bwd, symbolic_zeros=True)


def _same_pads(k: int) -> tuple[int, int]:
    return ((k - 1) // 2, k - 1 - (k - 1) // 2)


def layer_config(padding: str, kernel_size: int, pool: int) -> LayerCfg:
    """One layer's static configuration for :func:`conv_stack`: its padding
    (one of :data:`PADDINGS`, as ``nn.Conv`` pads a ``kernel_size`` square kernel)
    and its pool size (0: no pooling)."""
    if padding.upper() == "VALID":
        return ((0, 0), (0, 0)), pool
    if padding.upper() == "SAME":
        return (_same_pads(kernel_size),) * 2, pool
    raise ValueError(f"the fast conv implements padding {' or '.join(PADDINGS)}, not {padding!r}")


def conv_stack(x: jax.Array, ws: Sequence[jax.Array], bs: Sequence[jax.Array],
               cfg: Sequence[LayerCfg]) -> jax.Array:
    """``[max_pool](relu(conv(x, w) + b))`` for each layer in turn (NHWC input, HWIO
    kernels, stride 1, ``cfg`` from :func:`layer_config`), with the custom gradient."""
    if FUSE_STACK:
        return _conv_stack(x, tuple(ws), tuple(bs), tuple(cfg))
    for w, b, c in zip(ws, bs, cfg):
        x = _conv_stack(x, (w,), (b,), (c,))
    return x


class ConvParams(nn.Module):
    """Declares ``nn.Conv``'s parameters (same names, shapes and, by default, initialisers)."""

    features: int
    kernel_size: int
    in_features: int
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (k, k, self.in_features, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return kernel, bias
