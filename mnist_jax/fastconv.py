"""The fast CPU convolution stack behind ``CNN(impl="fast")``.

XLA's CPU backend is slow at the gradients of ``conv`` and of ``max_pool``
(select-and-scatter), and every MB of a step's temporaries costs page faults on
every call.  :func:`conv_stack` therefore runs the whole conv stack (conv -> ReLU
[-> max-pool] per layer) as one ``jax.custom_vjp``:

* each conv is im2col (shifted slices concatenated) + one matmul; the forward of a
  one-channel layer is XLA's conv, and a pooled layer computes only the outputs its
  pool reads;
* pooling is a reshape + max that also records an int8 "which element won" code
  (gradient to the first maximum, exactly like select-and-scatter);
* the batch is processed in chunks of ~:data:`CHUNK_BYTES` of im2col so temporaries
  stay small; the backward recomputes the earlier layers per chunk instead of
  storing them.

It declares the same parameters as ``nn.Conv`` (:class:`ConvParams`), so the "fast"
and "xla" CNNs share one parameter tree.  See ``benchmarks/step_variants.py`` for
timings of these choices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

__all__ = ["PADDINGS", "ConvParams", "layer_config", "conv_stack"]

PADDINGS = ("VALID", "SAME")
"""Paddings the fast path implements (a CNN with another falls back to XLA's conv)."""

# Target size (bytes) of one batch chunk's im2col buffer.
CHUNK_BYTES = 4 << 20
# Fuse all conv layers into one custom-VJP stack (recomputing the early layers'
# activations per chunk in the backward) rather than one per layer.
FUSE_STACK = True
# Layers with at most this many input channels run their forward through XLA's conv:
# im2col of a 1-channel image is a 9x copy feeding a K=9 matmul, which XLA's conv beats
# (convnet step 10.7 -> 10.0 ms; the default CNN unchanged).  Gradients stay im2col.
XLA_CONV_MAX_CIN = 1

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


def _layer_bwd(x, w, cfg: LayerCfg, aux, g):
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


def _stack_chunk(x: jax.Array, w: Sequence[tuple[int, ...]], cfg: tuple[LayerCfg, ...]) -> int:
    """Batch chunk for the stack: the largest im2col buffer ~ CHUNK_BYTES."""
    per_example, h, wd, c = 0, x.shape[1], x.shape[2], x.shape[3]
    for (pads, pool), (kh, kw, _, co) in zip(cfg, w):
        ho, wo = h + sum(pads[0]) - kh + 1, wd + sum(pads[1]) - kw + 1
        per_example = max(per_example, ho * wo * kh * kw * c)
        h, wd, c = (ho // pool, wo // pool, co) if pool else (ho, wo, co)
    return _chunk_size(x.shape[0], per_example * x.dtype.itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_stack(x: jax.Array, ws: tuple, bs: tuple, cfg: tuple[LayerCfg, ...]) -> jax.Array:
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
