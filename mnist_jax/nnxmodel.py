"""Flax NNX models in the train state: :class:`NNXModel` gives an ``nnx.Module`` the
linen-shaped ``init`` / ``apply`` pair that the rest of mnist-jax calls.

Everything compiled here is a pure function of the train state, and an NNX module is an
object that owns its arrays. The two meet through ``nnx.split`` / ``nnx.merge``, done
while tracing (so they cost nothing at run time):

* the module's ``nnx.Param`` variables are the state's ``params``;
* every other variable it updates (``nnx.BatchStat``, a user's own ``nnx.Variable``
  subclasses) is the state's ``model_state[NNX_STATE]``: updated by training steps, used
  by evaluation, checkpointed, stacked per model in a sweep;
* its random streams (``nnx.Rngs`` and the streams that ``nnx.Dropout`` keeps) are NOT
  state: every call gives each stream a key derived from the ``dropout`` key the train step
  passes (the state's rng folded with the step) and a zero count. So dropout depends on
  the seed and the step alone, as for a linen module, and a run repeats and resumes bitwise.

Trees are stored as nested dicts with string keys (an ``nnx.List`` indexes its layers by
int), which checkpoints, ``params.msgpack`` and the summary read like linen's.

A model is called as Flax's documentation calls it, ``model(x)`` on float32 images
(B, 28, 28) in [0, 1], after ``model.train()`` or ``model.eval()``.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_jax.errors import UsageError, first_line

__all__ = ["NNX_STATE", "NNXModel"]

NNX_STATE = "nnx_state"
"""The ``model_state`` collection holding an NNX model's variables besides its params."""

_CHECK_BATCH = 2


def _str_keys(tree: Any) -> Any:
    """A pure nested dict with every key a string."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like(template: Any, tree: Any) -> Any:
    """``tree`` (string keys) with the keys of ``template`` (as ``nnx`` made them)."""
    if isinstance(template, dict):
        return {k: _like(v, tree[str(k)]) for k, v in template.items()}
    return tree


def _pure(state: nnx.State) -> dict[str, Any]:
    return _str_keys(nnx.to_pure_dict(state))


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class NNXModel:
    """An NNX model seen through linen's ``init`` / ``apply`` (see the module docstring).

    ``make(rngs)`` builds the ``nnx.Module`` (a class, ``functools.partial`` of one, or any
    callable called as ``make(rngs=nnx.Rngs(key))``); ``instance`` is a module already built,
    whose own weights :meth:`init` returns whatever the key. ``name`` and ``kwargs`` say
    how ``config.json`` records it (see :func:`mnist_jax.usermodel.describe`).
    Construction traces the model by shapes once and raises a one-line
    :class:`~mnist_jax.errors.UsageError` when it cannot serve as an MNIST classifier.
    """

    def __init__(self, make: Callable[..., nnx.Module] | None = None, *,
                 instance: nnx.Module | None = None, target: Any = None,
                 kwargs: dict[str, Any] | None = None):
        if (make is None) == (instance is None):
            raise ValueError("give exactly one of make and instance")
        self._make, self._instance = make, instance
        self.target = target if target is not None else (make or type(instance))
        self.kwargs = kwargs
        self.name = getattr(self.target, "__name__", type(self.target).__name__)
        abstract = instance if instance is not None else self._build_abstract()
        self._graphdef, params, rngs, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
        self._params_keys = nnx.to_pure_dict(params)
        self._rest_keys = nnx.to_pure_dict(rest)
        self._rng_leaves = [(path, isinstance(var, nnx.RngKey))
                            for path, var in nnx.to_flat_state(rngs)]
        self._check_forward()

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_callable(cls, make: Callable[..., nnx.Module]) -> NNXModel:
        """A class, a ``functools.partial`` of one, or a function returning a module."""
        target, kwargs = make, {}
        if isinstance(make, functools.partial) and not make.args:
            target, kwargs = make.func, dict(make.keywords)
        return cls(make, target=target, kwargs=kwargs)

    @classmethod
    def from_instance(cls, module: nnx.Module) -> NNXModel:
        """A module already built: trained from its own weights."""
        return cls(instance=module)

    def _build_abstract(self) -> nnx.Module:
        try:
            module = nnx.eval_shape(lambda: self._make(rngs=nnx.Rngs(0)))
        except TypeError as e:
            if "rngs" in str(e):
                raise UsageError(f"NNX model {self.name}: it takes no rngs argument; mnist-jax "
                                 f"builds it as {self.name}(rngs=nnx.Rngs(seed))") from None
            raise self._bad("its constructor failed", e) from None
        except Exception as e:  # noqa: BLE001 - whatever the user's constructor raises
            raise self._bad("its constructor failed", e) from None
        if not isinstance(module, nnx.Module):
            raise UsageError(f"NNX model {self.name}: {self.name}(rngs=...) does not return "
                             "an nnx.Module")
        return module

    def _bad(self, what: str, e: BaseException) -> UsageError:
        return UsageError(f"NNX model {self.name}: {what} ({type(e).__name__}: {first_line(e)})")

    def _check_forward(self) -> None:
        """Trace one training and one inference call on a (B, 28, 28) batch: the model must
        return floating-point logits (B, 10)."""
        x = jax.ShapeDtypeStruct((_CHECK_BATCH, 28, 28), jnp.float32)
        variables = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        for train in (True, False):
            try:
                out = jax.eval_shape(functools.partial(
                    self.apply, train=train, rngs={"dropout": jax.random.PRNGKey(0)}),
                    variables, x)
            except Exception as e:  # noqa: BLE001 - whatever the user's forward raises
                raise self._bad(f"its forward pass fails on a (B, 28, 28) batch "
                                f"({'training' if train else 'inference'})", e) from None
            check_logits(self.name, out)

    # -- the linen-shaped contract ----------------------------------------------------
    def init(self, key: jax.Array, x: Any = None, *, train: bool = False) -> dict[str, Any]:
        """``{"params": ..., NNX_STATE: ...}`` of a module built from ``key`` (an
        instance's own weights, whatever the key); ``x`` and ``train`` as linen's, unused."""
        del x, train
        module = (self._instance if self._instance is not None
                  else self._make(rngs=nnx.Rngs(key)))
        _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        variables = {"params": _pure(params)}
        if self._rest_keys:
            variables[NNX_STATE] = _pure(rest)
        return variables

    def apply(self, variables: dict[str, Any], x: jax.Array, *, train: bool = False,
              rngs: dict[str, jax.Array] | None = None, mutable: Any = False) -> Any:
        """The logits of ``model(x)`` after ``model.train()`` or ``model.eval()``; with
        ``mutable`` also ``{NNX_STATE: ...}``, the variables the call updated."""
        module = self.module(variables, rngs)
        if train:
            module.train()
        else:
            module.eval()
        logits = module(x)
        if not mutable:
            return logits
        _, _, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return logits, ({NNX_STATE: _pure(rest)} if self._rest_keys else {})

    def module(self, variables: dict[str, Any],
               rngs: dict[str, jax.Array] | None = None) -> nnx.Module:
        """The ``nnx.Module`` holding ``variables`` (one model's): e.g. a trained run's
        ``mj.load_run(dir).model.module(state.variables)`` to use it in plain Flax."""
        params = _like(self._params_keys, variables["params"])
        rest = _like(self._rest_keys, variables.get(NNX_STATE, {}))
        return nnx.merge(self._graphdef, params, self._streams(rngs), rest)

    def _streams(self, rngs: dict[str, jax.Array] | None) -> dict[str, Any]:
        """Every random stream of the module keyed from ``rngs["dropout"]``, counts at 0."""
        base = (rngs or {}).get("dropout")
        if base is None:  # inference: a fixed key (nothing random is meant to be drawn)
            base = jax.random.PRNGKey(0)
        if not jnp.issubdtype(base.dtype, jax.dtypes.prng_key):
            base = jax.random.wrap_key_data(base)
        tree: dict[str, Any] = {}
        for i, (path, is_key) in enumerate(self._rng_leaves):
            _set(tree, path, jax.random.fold_in(base, i) if is_key
                 else jnp.zeros((), jnp.uint32))
        return tree

    def describe(self) -> tuple[Any, str | None]:
        """``(target, model_args)``: what builds the model again, and its JSON keyword
        arguments (None when there are none or JSON cannot hold them)."""
        try:
            return self.target, json.dumps(self.kwargs) if self.kwargs else None
        except TypeError:
            return self.target, None

    def __repr__(self) -> str:
        return f"NNXModel({self.name})"


def check_logits(name: str, out: Any) -> None:
    """Refuse a model whose output for a batch of :data:`_CHECK_BATCH` images is not
    floating-point logits (B, 10)."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape is None or dtype is None:
        raise UsageError(f"model {name}: it returns {type(out).__name__}, not an array of "
                         "logits (B, 10)")
    if tuple(shape) != (_CHECK_BATCH, 10):
        raise UsageError(f"model {name}: it returns shape {tuple(shape)} for a batch of "
                         f"{_CHECK_BATCH} images; MNIST needs logits (B, 10)")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise UsageError(f"model {name}: it returns {dtype} values; logits must be floating "
                         "point")
