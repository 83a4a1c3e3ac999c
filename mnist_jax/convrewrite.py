"""Any model's convolutions on the fast CPU formulation, without touching the model.

Inside a compiled loop (the epoch's ``lax.scan``, the models' ``lax.map``) XLA:CPU runs
``conv_general_dilated`` and its gradients several times slower than the same work
written as shifted slices (im2col) and one matrix product (docs/cpu-convolutions.md), and
its max-pooling gradient (select-and-scatter) is slow too. :func:`fast_convolutions` wraps
a function (a model's ``apply``) so that, when it is traced, its jaxpr is taken
(``jax.make_jaxpr`` on the arguments it is called with) and evaluated again with

* chains of conv (stride 1, NHWC, float32) -> bias -> ``jax.nn.relu`` with a p x p
  max-pool before or after the ReLU, one after another, as the built-in CNNs' fused
  custom-VJP stack (:func:`mnist_jax.fastconv.conv_stack`; :data:`FUSE_STACKS`);
* other float32 2-D convolutions (any stride, padding within the kernel, no dilation or
  feature groups) as XLA's own, with gradients written as plain-layout convolutions
  (:func:`canonical_conv`; :data:`CANONICAL_CONVS`): it is the gradients JAX derives whose
  exchanged dimension roles XLA:CPU runs slowly inside a loop;
* every other ``conv_general_dilated`` (any padding, stride, input and kernel dilation,
  feature groups, dimension numbers, any number of spatial dimensions) as im2col + one
  ``dot_general`` (:func:`conv_as_matmul`), and
* every non-overlapping max-pool ``reduce_window_max`` (window = stride, no dilation)
  as a reshape + max whose gradient goes to the first maximum of each window, as XLA's
  select-and-scatter sends it (:func:`window_max`),

substituted. This happens before differentiation: the wrapped function is called
inside the loss, so JAX differentiates the fast form. Nested jaxprs are followed: calls
(``jit``, ``closed_call``) are inlined, ``remat`` is kept around the rewritten body, and
loops and branches (``scan``, ``while``, ``cond``) get rewritten bodies. Custom
derivative rules (``custom_jvp`` / ``custom_vjp`` calls, e.g. ``jax.nn.relu`` or the
built-in :mod:`mnist_jax.fastconv` stack) are bound as they are: their own rule stays
the gradient, and what is inside them is not rewritten.

A convolution this cannot rewrite (``batch_group_count`` > 1, one inside a primitive
it does not know) stays XLA's, with one :class:`SlowConvolutionWarning` per layer and
reason naming the layer (its name stack, e.g. ``Net/Conv_0``) and why.

:func:`resolve` turns the user's choice ("auto", "fast", "xla") into whether to
rewrite: "auto" rewrites on the CPU backend only; GPUs and TPUs run XLA's convolutions
well.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal
from jax.extend.core import primitives as prims

from mnist_jax import fastconv

try:  # the name stack and traceback of each rewritten op, for profiles and errors
    from jax._src import source_info_util as _source_info
except ImportError:  # pragma: no cover - a JAX without it only loses the op names
    _source_info = None

__all__ = ["CHOICES", "SlowConvolutionWarning", "conv_as_matmul", "fast_convolutions",
           "resolve", "window_max"]

CHOICES = ("auto", "fast", "xla")
"""What a user may ask for: rewrite on the CPU only, always, or never."""


class SlowConvolutionWarning(UserWarning):
    """A convolution was left to XLA's implementation (slow on the CPU in a loop)."""


def resolve(choice: str, platform: str | None = None) -> bool:
    """Whether ``choice`` (one of :data:`CHOICES`) rewrites convolutions on ``platform``
    (default: JAX's default backend)."""
    if choice not in CHOICES:
        raise ValueError(f"unknown convolution implementation {choice!r}; choose from "
                         f"{', '.join(CHOICES)}")
    if choice == "auto":
        return (platform or jax.default_backend()) == "cpu"
    return choice == "fast"


# ---- the rewritten convolution ---------------------------------------------------


def _patches(x: jax.Array, kernel: Sequence[int], strides: Sequence[int],
             dilation: Sequence[int], out: Sequence[int]) -> jax.Array:
    """im2col of a padded (N, *spatial, C) input: (N, *out, taps*C), taps in row-major
    kernel order, channels fastest (the order of a (*kernel, C, O) kernel's rows)."""
    n, c = x.shape[0], x.shape[-1]
    taps = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        start = [o * d for o, d in zip(offset, dilation)]
        limit = [s + (m - 1) * st + 1 for s, m, st in zip(start, out, strides)]
        taps.append(lax.slice(x, (0, *start, 0), (n, *limit, c), (1, *strides, 1)))
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, *, window_strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], lhs_dilation: Sequence[int],
                   rhs_dilation: Sequence[int], dimension_numbers: Any,
                   feature_group_count: int = 1, precision: Any = None,
                   preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` (the primitive's parameters, ``dimension_numbers`` a
    ``ConvDimensionNumbers``; ``batch_group_count`` 1) as im2col + one ``dot_general``.

    Padding and input dilation are one ``lax.pad`` (negative padding crops, as XLA's);
    strides and kernel dilation pick the slices; feature groups are a batch dimension
    of the product."""
    dn, nsp = dimension_numbers, len(window_strides)
    x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # N S.. C
    w = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))  # S.. I O
    pads = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)),
            (0, 0, 0)]
    if any(any(p) for p in pads):
        x = lax.pad(x, jnp.zeros((), x.dtype), pads)
    kernel, (cg, co) = w.shape[:nsp], w.shape[nsp:]
    out = [(x.shape[1 + i] - (k - 1) * d - 1) // s + 1
           for i, (k, d, s) in enumerate(zip(kernel, rhs_dilation, window_strides))]
    cols = _patches(x, kernel, window_strides, rhs_dilation, out)
    taps, g = math.prod(kernel), feature_group_count
    if g == 1:
        y = lax.dot_general(cols, w.reshape(taps * cg, co),
                            (((cols.ndim - 1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    else:  # group j reads input channels j*cg:(j+1)*cg and writes outputs j*co/g:...
        cols = cols.reshape(*cols.shape[:-1], taps, g, cg)
        wg = w.reshape(taps, cg, g, co // g)
        lead = tuple(range(cols.ndim - 3))
        y = lax.dot_general(cols, wg, (((cols.ndim - 3, cols.ndim - 1), (0, 1)),
                                       ((cols.ndim - 2,), (2,))),
                            precision=precision, preferred_element_type=preferred_element_type)
        # (g, N, *out, co/g) -> (N, *out, g*co/g)
        y = jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:len(lead) + 1], co)
    perm = [0] * (nsp + 2)
    perm[dn.out_spec[0]], perm[dn.out_spec[1]] = 0, nsp + 1
    for i, axis in enumerate(dn.out_spec[2:]):
        perm[axis] = 1 + i
    return jnp.transpose(y, perm)


def _conv_unsupported(eqn) -> str | None:
    """Why ``eqn`` (a ``conv_general_dilated``) is not rewritten, or None."""
    p = eqn.params
    if p["batch_group_count"] != 1:
        return "batch_group_count > 1"
    if p.get("out_sharding") is not None:
        return "an explicit output sharding"
    if any(s <= 0 for s in eqn.outvars[0].aval.shape):
        return "an empty output"
    return None


_DN = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def canonical_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...],
                   strides: tuple[int, int] = (1, 1), precision: Any = None) -> jax.Array:
    """A 2-D convolution of an NHWC ``x`` with an HWIO ``w``, XLA's own, whose gradients
    are XLA convolutions in the same plain layouts.

    The gradients that JAX derives for a convolution are convolutions with exchanged
    dimension roles (a kernel with input and output swapped, the batch contracted), and
    inside a compiled loop XLA:CPU runs those tens of times slower than alone; the
    forward convolution and these plain-layout forms run at their usual speed there
    (docs/cpu-convolutions.md). ``padding`` is ((lo, hi), (lo, hi)), each within
    [0, kernel - 1]; ``strides`` any positive pair.
    """
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                    precision=precision)


def _canonical_fwd(x, w, padding, strides, precision):
    return canonical_conv(x, w, padding, strides, precision), (x, w)


def _canonical_bwd(padding, strides, precision, res, g):
    x, w = res
    kernel = w.shape[:2]
    # input rows past the last window a stride reaches: they get no gradient
    left = [(n + lo + hi - k) % s for n, k, s, (lo, hi) in zip(x.shape[1:3], kernel, strides,
                                                                  padding)]
    # dx: the output's gradient, spread out by the strides, correlated with the flipped
    # kernel, input and output channels exchanged ("full" padding less the forward's)
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    full = [(k - 1 - lo, k - 1 - hi + r) for k, (lo, hi), r in zip(kernel, padding, left)]
    dx = lax.conv_general_dilated(g, flipped, (1, 1), full, lhs_dilation=strides,
                                  dimension_numbers=_DN, precision=precision)
    # dw: channels of x as the batch, its batch as the features, the output's gradient
    # (H, W, N, O), dilated by the strides, as the kernel: the result is (I, kh, kw, O)
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                  [(lo, hi - r) for (lo, hi), r in zip(padding, left)],
                                  rhs_dilation=strides, dimension_numbers=_DN,
                                  precision=precision)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)

CANONICAL_CONVS = True
"""2-D convolutions outside the fused stacks run as :func:`canonical_conv`, not im2col:
XLA's forward and plain-layout gradient convolutions beat im2col there (for strided ones
once the epoch compiles with :data:`mnist_jax.training.CPU_LIBRARY_FUSIONS`)."""


def _canonical_args(eqn) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The transposes that bring ``eqn``'s operands to NHWC / HWIO when it is a
    convolution :func:`canonical_conv` computes, else None."""
    p = eqn.params
    if not (CANONICAL_CONVS and len(p["window_strides"]) == 2 and _is_f32(*eqn.invars)
            and tuple(p["lhs_dilation"]) == (1, 1)
            and tuple(p["rhs_dilation"]) == (1, 1) and p["feature_group_count"] == 1
            and p["batch_group_count"] == 1 and p["preferred_element_type"] is None):
        return None
    dn = p["dimension_numbers"]
    kernel = [eqn.invars[1].aval.shape[a] for a in dn.rhs_spec[2:]]
    if not all(0 <= lo <= k - 1 and 0 <= hi <= k - 1
               for k, (lo, hi) in zip(kernel, p["padding"])):
        return None
    return ((dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]),
            (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))


def _rewrite_conv(eqn, lhs, rhs):
    p = eqn.params
    perms = _canonical_args(eqn)
    if perms is not None:
        y = canonical_conv(jnp.transpose(lhs, perms[0]), jnp.transpose(rhs, perms[1]),
                           tuple(map(tuple, p["padding"])), tuple(p["window_strides"]),
                           p["precision"])
        out = p["dimension_numbers"].out_spec  # y is N H W C
        return jnp.transpose(y, np.argsort((out[0], *out[2:], out[1])))
    return conv_as_matmul(lhs, rhs, window_strides=p["window_strides"], padding=p["padding"],
                          lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                          dimension_numbers=p["dimension_numbers"],
                          feature_group_count=p["feature_group_count"],
                          precision=p["precision"],
                          preferred_element_type=p["preferred_element_type"])


# ---- the rewritten max-pool -------------------------------------------------------


def _window_index(windows: Sequence[int]) -> np.ndarray:
    """Row-major index of each element of a window, shaped (1, w0, 1, w1, ...)."""
    idx = np.arange(math.prod(windows)).reshape(windows)
    return idx.reshape([d for w in windows for d in (1, w)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _blocked_max(x: jax.Array, windows: tuple[int, ...]) -> jax.Array:
    """Max over the odd axes of ``x`` shaped (o0, w0, o1, w1, ...)."""
    return x.max(axis=tuple(range(1, x.ndim, 2)))


def _blocked_max_fwd(x, windows):
    axes = tuple(range(1, x.ndim, 2))
    m = x.max(axis=axes)
    size = math.prod(windows)
    spread = jnp.expand_dims(m, axes)
    # the first maximum of each window, as select-and-scatter (select ``ge``) picks it
    code = jnp.where(x == spread, _window_index(windows), size).min(axis=axes)
    return m, code.astype(jnp.int8 if size < 127 else jnp.int32)


def _blocked_max_bwd(windows, code, g):
    axes = tuple(range(1, 2 * len(windows), 2))
    hit = jnp.expand_dims(code, axes) == _window_index(windows)
    return (jnp.where(hit, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype)),)


_blocked_max.defvjp(_blocked_max_fwd, _blocked_max_bwd)


def window_max(x: jax.Array, windows: Sequence[int],
               padding: Sequence[tuple[int, int]]) -> jax.Array:
    """``lax.reduce_window`` max with window = stride ``windows`` per axis and
    ``padding`` (padded with -inf, as XLA's): a reshape and a max whose gradient
    goes to each window's first maximum."""
    if any(lo or hi for lo, hi in padding):
        x = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    out = [d // w for d, w in zip(x.shape, windows)]
    x = x[tuple(slice(0, o * w) for o, w in zip(out, windows))]
    blocked = x.reshape([d for o, w in zip(out, windows) for d in (o, w)])
    return _blocked_max(blocked, tuple(windows))


REWRITE_POOLS = True


def _pool_rewritable(eqn) -> bool:
    p = eqn.params
    return (REWRITE_POOLS and tuple(p["window_dimensions"]) == tuple(p["window_strides"])
            and all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"]))
            and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)
            and math.prod(p["window_dimensions"]) > 1)


# ---- conv -> bias -> ReLU [-> max-pool] stacks onto the built-in fast stack ----------

FUSE_STACKS = True
"""Run chains of conv (stride 1, NHWC/HWIO, float32) -> bias -> ReLU and a 2-D max-pool
(before or after the ReLU) through :func:`mnist_jax.fastconv.conv_stack`, the built-in
CNNs' custom-VJP stack, instead of the per-op rewrite."""

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One conv layer of a fusable stack, found in a jaxpr."""

    eqns: tuple[int, ...]  # the equations it replaces (conv, bias add, ReLU, pool)
    x: Any  # the conv's input and kernel (jaxpr atoms); the bias vector or None
    w: Any
    b: Any
    pads: tuple[tuple[int, int], tuple[int, int]]
    pool: int
    out: Any  # the variable holding the layer's output


def _is_f32(*atoms) -> bool:
    return all(a.aval.dtype == jnp.float32 for a in atoms)


def _stack_conv(eqn) -> bool:
    if eqn.primitive is not prims.conv_general_dilated_p:
        return False
    p = eqn.params
    dn = p["dimension_numbers"]
    return (eqn.primitive is prims.conv_general_dilated_p and len(p["window_strides"]) == 2
            and (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC
            and all(v == 1 for v in (*p["window_strides"], *p["lhs_dilation"],
                                     *p["rhs_dilation"]))
            and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
            and p["preferred_element_type"] is None and p.get("out_sharding") is None
            and all(v >= 0 for pad in p["padding"] for v in pad)
            and _is_f32(*eqn.invars, *eqn.outvars))


def _stack_pool(eqn) -> int:
    """The pool size of a 2-D NHWC p x p, stride p, unpadded max-pool equation, or 0."""
    if eqn.primitive is not prims.reduce_window_max_p:
        return 0
    p = eqn.params
    win = tuple(p["window_dimensions"])
    if (len(win) == 4 and win[0] == win[3] == 1 and win[1] == win[2] > 1
            and tuple(p["window_strides"]) == win
            and all(v == 0 for pad in p["padding"] for v in pad)
            and all(v == 1 for v in (*p["base_dilation"], *p["window_dilation"]))):
        return win[1]
    return 0


def _is_relu(eqn) -> bool:
    """Whether ``eqn`` is ``jax.nn.relu`` (``nn.relu``, ``nnx.relu``): a custom_jvp whose
    gradient at 0 is 0, as the stack's is (``jnp.maximum(x, 0)``'s is 1/2 there)."""
    if eqn.primitive is not prims.custom_jvp_call_p:
        return False
    info = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
    src = getattr(info, "func_src_info", "") or ""
    return src.startswith("relu at ") and "jax/_src/nn/functions.py" in src.replace("\\", "/")


class _Graph:
    """Who produces and who consumes each variable of a jaxpr."""

    def __init__(self, jaxpr: Jaxpr):
        self.eqns = jaxpr.eqns
        self.producer: dict[Any, int] = {}
        self.consumers: dict[Any, list[int]] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, Literal):
                    self.consumers.setdefault(v, []).append(i)
            for v in eqn.outvars:
                self.producer[v] = i
        for v in jaxpr.outvars:
            if not isinstance(v, Literal):
                self.consumers.setdefault(v, []).extend([-1, -1])  # an output: never fused

    def sole_consumer(self, v) -> int | None:
        users = self.consumers.get(v, [])
        return users[0] if len(users) == 1 else None

    def bias_of(self, add_eqn, z) -> Any:
        """The (O,) bias vector that ``add_eqn`` adds to ``z`` (reshaped to (1,1,1,O))."""
        other = [v for v in add_eqn.invars if v is not z]
        if len(add_eqn.invars) != 2 or len(other) != 1 or isinstance(other[0], Literal):
            return None
        i = self.producer.get(other[0])
        if i is None or self.eqns[i].primitive is not prims.reshape_p:
            return None
        b = self.eqns[i].invars[0]
        co = z.aval.shape[-1]
        ok = (b.aval.shape == (co,) and other[0].aval.shape == (1, 1, 1, co) and _is_f32(b))
        return b if ok else None


def _layer_at(g: _Graph, i: int) -> _Layer | None:
    """The fusable layer whose conv is equation ``i``, or None."""
    conv = g.eqns[i]
    if not _stack_conv(conv):
        return None
    eqns, z, bias, pool = [i], conv.outvars[0], None, 0
    j = g.sole_consumer(z)
    if j is not None and j >= 0 and g.eqns[j].primitive is prims.add_p:
        bias = g.bias_of(g.eqns[j], z)
        if bias is not None:
            eqns.append(j)
            z = g.eqns[j].outvars[0]
            j = g.sole_consumer(z)
    if j is not None and j >= 0 and _stack_pool(g.eqns[j]):
        pool = _stack_pool(g.eqns[j])
        eqns.append(j)
        z = g.eqns[j].outvars[0]
        j = g.sole_consumer(z)
    if j is None or j < 0 or not _is_relu(g.eqns[j]):
        return None
    eqns.append(j)
    z = g.eqns[j].outvars[0]
    j = g.sole_consumer(z)
    if not pool and j is not None and j >= 0 and _stack_pool(g.eqns[j]):
        pool = _stack_pool(g.eqns[j])  # ReLU and max-pool commute
        eqns.append(j)
        z = g.eqns[j].outvars[0]
    pads = tuple(tuple(p) for p in conv.params["padding"])
    return _Layer(tuple(eqns), conv.invars[0], conv.invars[1], bias, pads, pool, z)


def _find_stacks(jaxpr: Jaxpr) -> tuple[dict[int, list[_Layer]], set[int]]:
    """Fusable stacks by the index of their last equation, and every equation they
    replace. A layer joins the stack before it when its input is that stack's output
    and nothing else reads it."""
    if not FUSE_STACKS:
        return {}, set()
    g, stacks, taken = _Graph(jaxpr), [], set()
    for i, eqn in enumerate(jaxpr.eqns):
        if i in taken or eqn.primitive is not prims.conv_general_dilated_p:
            continue
        layer = _layer_at(g, i)
        if layer is None:
            continue
        stack = [layer]
        taken.update(layer.eqns)
        while True:
            j = g.sole_consumer(stack[-1].out)
            nxt = _layer_at(g, j) if j is not None and j >= 0 else None
            if nxt is None or nxt.x is not stack[-1].out:
                break
            stack.append(nxt)
            taken.update(nxt.eqns)
        stacks.append(stack)
    return {max(i for layer in st for i in layer.eqns): st for st in stacks}, taken


def _run_stack(stack: list[_Layer], read: Callable) -> jax.Array:
    ws = [read(layer.w) for layer in stack]
    bs = [read(layer.b) if layer.b is not None else jnp.zeros(w.shape[-1], w.dtype)
          for layer, w in zip(stack, ws)]
    return fastconv.conv_stack(read(stack[0].x), ws, bs,
                               [(layer.pads, layer.pool) for layer in stack])


# ---- the interpreter -----------------------------------------------------------------

_CALLS = (prims.jit_p, prims.closed_call_p, prims.call_p)
# Bound as they are: their own rule is the gradient (the built-in fast conv stack, relu).
_OPAQUE = (prims.custom_jvp_call_p, prims.custom_vjp_call_p)
_warned: set[tuple[str, str]] = set()


def _layer(eqn) -> str:
    stack = str(eqn.source_info.name_stack) if _source_info is not None else ""
    if stack:
        return stack
    if _source_info is not None:
        return _source_info.summarize(eqn.source_info)
    return "a convolution"


def _warn(eqn, why: str) -> None:
    key = (_layer(eqn), why)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"the convolution of {key[0]} runs as XLA's, slow on the CPU inside the "
                  f"compiled epoch: {why}", SlowConvolutionWarning, stacklevel=2)


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, Jaxpr):
                yield v


def _needs_rewrite(jaxpr: Jaxpr) -> bool:
    """Whether ``jaxpr`` holds a convolution or a rewritable pool outside custom rules."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is prims.conv_general_dilated_p:
            return True
        if eqn.primitive is prims.reduce_window_max_p and _pool_rewritable(eqn):
            return True
        if eqn.primitive not in _OPAQUE and any(map(_needs_rewrite, _sub_jaxprs(eqn.params))):
            return True
    return False


def _rewrite_closed(closed: ClosedJaxpr) -> ClosedJaxpr:
    """``closed`` with its convolutions and pools rewritten (same inputs and outputs)."""
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
             for a in closed.in_avals]
    new = jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a))(*avals)
    if [(a.shape, a.dtype) for a in new.out_avals] != [(a.shape, a.dtype)
                                                       for a in closed.out_avals]:
        raise TypeError("the rewritten body's outputs differ")
    return new


def _bind(eqn, invals, params=None):
    bind_params = eqn.primitive.get_bind_params(params or eqn.params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
        return eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return eqn.primitive.bind(*invals, **bind_params)


def _eval_eqn(eqn, invals):
    prim = eqn.primitive
    if prim is prims.conv_general_dilated_p:
        why = _conv_unsupported(eqn)
        if why is None:
            return _rewrite_conv(eqn, *invals)
        _warn(eqn, why)
        return _bind(eqn, invals)
    if prim is prims.reduce_window_max_p and _pool_rewritable(eqn):
        return window_max(invals[0], eqn.params["window_dimensions"], eqn.params["padding"])
    if prim in _OPAQUE or not any(map(_needs_rewrite, _sub_jaxprs(eqn.params))):
        return _bind(eqn, invals)
    if prim in _CALLS:  # inline: the surrounding program is compiled as one anyway
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(sub, ClosedJaxpr):
            return _eval(sub.jaxpr, sub.consts, invals)
        return _eval(sub, (), invals)
    if prim is prims.remat_p:
        p = eqn.params
        body = jax.checkpoint(lambda *a: _eval(p["jaxpr"], (), a),
                              prevent_cse=p["prevent_cse"], policy=p["policy"])
        return body(*invals)
    try:  # loops and branches: the same primitive over rewritten bodies
        params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
    except TypeError as e:
        _warn(eqn, f"inside {prim.name} ({e})")
        return _bind(eqn, invals)
    return _bind(eqn, invals, params)


def _rewrite_param(value: Any) -> Any:
    if isinstance(value, ClosedJaxpr):
        return _rewrite_closed(value) if _needs_rewrite(value.jaxpr) else value
    if isinstance(value, Jaxpr):
        if _needs_rewrite(value):
            raise TypeError("an open jaxpr")
        return value
    if isinstance(value, tuple) and any(isinstance(v, (ClosedJaxpr, Jaxpr)) for v in value):
        return tuple(_rewrite_param(v) for v in value)
    return value


def _eval(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` as ``jax.core.eval_jaxpr`` does, rewriting as it goes."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, val in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
        env[v] = val
    stacks, fused = _find_stacks(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        if i in fused:  # read only inside its stack: computed there, at the stack's end
            if i in stacks:
                with _context(eqn):
                    env[stacks[i][-1].out] = _run_stack(stacks[i], read)
            continue
        invals = [read(v) for v in eqn.invars]
        with _context(eqn), eqn.ctx.manager:
            outs = _eval_eqn(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            if not isinstance(v, DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _context(eqn):
    """The equation's traceback and name stack around the ops that replace it."""
    if _source_info is None:
        return _NullContext()
    name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
    return _source_info.user_context(eqn.source_info.traceback, name_stack=name_stack)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fast_convolutions(fn: Callable) -> Callable:
    """``fn`` with its convolutions (and non-overlapping max-pools) computed as im2col +
    matmul: same arguments, same results to float32 rounding, gradients included.

    Every argument is traced (pass static settings by closing over them); the jaxpr is
    taken on the arguments of each call, so call it where ``fn`` would be traced anyway
    (inside ``jit``, the loss under ``grad``). A function without a convolution or pool
    outside custom rules is called as it is."""

    @functools.wraps(fn)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        if not _needs_rewrite(closed.jaxpr):
            return fn(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return rewritten
