"""What a model is made of: parameter counts, a Keras-style summary, FLOPs.

All three trace the model by shapes only (``jax.eval_shape``): nothing is
compiled or run.  A :class:`~mnist_jax.models.CNN` is traced as its "xla"
variant, so that ReLU and pooling appear as layers.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mnist_jax.models import CNN

__all__ = ["count_params", "summary", "flops_per_example"]


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
