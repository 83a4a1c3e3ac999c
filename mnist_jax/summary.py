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
from flax import nnx

from mnist_jax.models import CNN
from mnist_jax.nnxmodel import NNXModel
from mnist_jax.usermodel import as_model

__all__ = ["count_params", "summary", "flops_per_example"]


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(math.prod(np.shape(a)) for a in jax.tree.leaves(params)))


class _Layer:
    """One traced module call: its scope path, type, input/output shapes, how many
    variables it holds (parameters and state such as BatchNorm's statistics, its
    submodules' included) and the shape of the ``kernel`` it owns itself, if any."""

    def __init__(self, path: tuple[str, ...], kind: str, in_shape: tuple, out_shape: tuple,
                 variables: dict[str, Any]):
        self.path, self.name, self.kind = path, "/".join(path), kind
        self.in_shape, self.out_shape = in_shape, out_shape
        self.n_params = sum(count_params(_subtree(v, path)) for v in variables.values())
        kernel = _subtree(variables.get("params", {}), path).get("kernel")
        self.kernel_shape = tuple(kernel.shape) if hasattr(kernel, "shape") else None


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree.get(name, {}) if isinstance(tree, dict) else {}
    return tree if isinstance(tree, dict) else {}


def _trace(model: nn.Module | NNXModel, input_shape: Sequence[int]
           ) -> tuple[list[_Layer], dict[str, Any]]:
    """Shape-only trace of ``model`` (the "xla" variant for a CNN, so that ReLU
    and pooling appear as layers) recording every module call, nested ones too, in
    call order; and the model's variables, by collection, as shapes."""
    if isinstance(model, NNXModel):
        return _trace_nnx(model, input_shape)
    if isinstance(model, CNN):
        model = model.clone(impl="xla")
    calls: list[tuple[tuple[str, ...], str, tuple, tuple]] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if (context.method_name == "__call__" and args and hasattr(args[0], "shape")
                and hasattr(out, "shape")):
            calls.append((tuple(mod.scope.path), type(mod).__name__, tuple(args[0].shape),
                          tuple(out.shape)))
        return out

    def init(x):
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.key(0), x, train=False)

    variables = dict(jax.eval_shape(init, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)))
    return [_Layer(path, kind, ins, outs, variables)
            for path, kind, ins, outs in calls], variables


def _trace_nnx(model: NNXModel, input_shape: Sequence[int]
               ) -> tuple[list[_Layer], dict[str, Any]]:
    """:func:`_trace` of an NNX model, in inference mode. NNX has no method interceptor,
    so the ``__call__`` of each submodule's class records its calls while tracing."""
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    calls: list[tuple[tuple[str, ...], str, tuple, tuple]] = []

    def recording(cls: type, paths: dict[int, tuple[str, ...]]):
        original = cls.__call__

        def call(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if id(self) in paths and args and hasattr(args[0], "shape") and hasattr(out, "shape"):
                calls.append((paths[id(self)], type(self).__name__, tuple(args[0].shape),
                              tuple(out.shape)))
            return out
        return original, call

    def run(variables, x):
        module = model.module(variables)
        module.eval()
        paths = {id(m): tuple(map(str, path)) for path, m in nnx.iter_modules(module) if path}
        classes = {type(m) for _, m in nnx.iter_modules(module)} - {type(module)}
        originals = {}
        try:
            for cls in classes:
                originals[cls], cls.__call__ = recording(cls, paths)
            module(x)
        finally:
            for cls, original in originals.items():
                cls.__call__ = original

    jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return [_Layer(path, kind, ins, outs, variables) for path, kind, ins, outs in calls], variables


def summary(model: Any, input_shape: Sequence[int] = (1, 28, 28)) -> str:
    """A Keras ``model.summary()``-style table: layer (type), output shape
    (batch shown as ``None``) and parameter count, then the totals. As in Keras, state
    such as BatchNorm's moving statistics counts as non-trainable parameters. ``model``
    is what :func:`mnist_jax.fit` takes: a linen module, or an NNX class or instance."""
    model = as_model(model)
    layers, variables = _trace(model, input_shape)
    # Keras lists the top level: the calls with no traced call above them (an NNX list's
    # layers, "convs/0", are top level: the list itself is never called)
    called = {layer.path for layer in layers}
    layers = [layer for layer in layers if layer.path
              and not any(layer.path[:k] in called for k in range(1, len(layer.path)))]
    labels = [f"{layer.name} ({layer.kind})" for layer in layers]
    width = max([32, *(len(label) + 1 for label in labels)])
    rule = "=" * (width + 34)
    name = model.name if isinstance(model, NNXModel) else type(model).__name__
    title = f'Model: "{name}"'
    if isinstance(model, CNN):
        title += f" (impl={model.resolved_impl})"
    lines = [title, f"{'Layer (type)':<{width}}{'Output Shape':<22}{'Param #':>12}", rule]
    for label, layer in zip(labels, layers):
        shape = "(None, " + ", ".join(str(d) for d in layer.out_shape[1:]) + ")"
        lines.append(f"{label:<{width}}{shape:<22}{layer.n_params:>12,}")
    trainable = count_params(variables.get("params", {}))
    fixed = count_params({k: v for k, v in variables.items() if k != "params"})
    lines += [rule, f"Total params: {trainable + fixed:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {fixed:,}"]
    return "\n".join(lines)


def flops_per_example(model: nn.Module, input_shape: Sequence[int] = (1, 28, 28)) -> dict[str, int]:
    """Matmul FLOPs per example, counted from the layer shapes as 2*MACs.

    ``forward``: every call of a layer that owns a ``kernel`` (Dense, Conv, at any depth
    of nested modules): output positions × kernel size, i.e. in*out for a Dense and
    Ho*Wo*Cout*kh*kw*Cin for a Conv.
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
        macs = math.prod(layer.out_shape[1:-1]) * math.prod(layer.kernel_shape)
        fwd += 2 * macs
        train += (4 if first else 6) * macs
        first = False
    return {"forward": fwd, "train": train}
