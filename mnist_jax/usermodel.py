"""Models of the user's, in either Flax API: a linen ``nn.Module`` or an NNX
``nnx.Module``, given as an object (the API) or named as ``path/to/file.py:ClassName`` /
``package.module:ClassName`` with optional JSON constructor arguments (the CLI).

The contract (the one the built-in models follow): ``model.apply(variables, images,
train=...)`` on float32 images ``(B, 28, 28)`` in [0, 1] returns logits ``(B, 10)``.
Collections besides ``params`` (BatchNorm's ``batch_stats``) are carried by the train
state. An NNX model gets that contract from :class:`~mnist_jax.nnxmodel.NNXModel`
(:func:`as_model`). Every failure to find or build the module is a one-line
:class:`UsageError`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import flax.linen as nn
from flax import nnx

from mnist_jax.errors import UsageError, first_line
from mnist_jax.models import check_field_types
from mnist_jax.nnxmodel import NNXModel


def is_model_spec(name: str) -> bool:
    """Whether ``name`` names a user's module (``…:ClassName``) rather than a preset."""
    return ":" in name


def normalize_spec(spec: str) -> str:
    """``file.py:Class`` with the file made absolute (so a run folder can rebuild it from
    anywhere); ``package.module:Class`` unchanged."""
    where, _, cls = spec.rpartition(":")
    if where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{cls}"
    return spec


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"invalid --model {str(path)!r}: no such file")
    name = f"mnist_jax_user_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"invalid --model {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass-based modules look their module up while defined
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file
        del sys.modules[name]
        raise UsageError(f"invalid --model {str(path)!r}: importing it failed "
                         f"({type(e).__name__}: {first_line(e)})") from None
    return module


def load_model_class(spec: str) -> type:
    """The ``nn.Module`` or ``nnx.Module`` subclass that ``spec`` names."""
    where, sep, cls_name = spec.rpartition(":")
    if not sep or not where or not cls_name:
        raise UsageError(f"invalid --model {spec!r}: expected path/to/file.py:ClassName or "
                         "package.module:ClassName")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where).expanduser())
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001 - ImportError, or any error while importing
            raise UsageError(f"invalid --model {spec!r}: cannot import {where} "
                             f"({type(e).__name__}: {first_line(e)})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise UsageError(f"invalid --model {spec!r}: {where} has no {cls_name}")
    if not _is_subclass(cls, (nn.Module, nnx.Module)):
        raise UsageError(f"invalid --model {spec!r}: {cls_name} is neither a flax.linen "
                         "Module nor an NNX Module")
    return cls


def _is_subclass(obj: Any, bases: tuple[type, ...]) -> bool:
    return isinstance(obj, type) and issubclass(obj, bases)


def build_user_model(spec: str, model_args: str | None = None) -> nn.Module | NNXModel:
    """Instantiate the module ``spec`` names with the JSON object ``model_args`` (an NNX
    module: its constructor's keyword arguments besides ``rngs``)."""
    cls = load_model_class(spec)
    kwargs = json.loads(model_args) if model_args else {}
    if not _is_subclass(cls, nn.Module):
        return _nnx_model(spec, cls, kwargs)
    try:
        check_field_types(cls, kwargs)
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - TypeError for unknown fields, the user's checks
        raise UsageError(f"invalid --model-args for {spec}: {type(e).__name__}: "
                         f"{first_line(e)}") from None


def _nnx_model(spec: str, make: Any, kwargs: dict[str, Any]) -> NNXModel:
    """The NNX model ``make(rngs=..., **kwargs)``, its arguments checked against the
    constructor's signature and annotations first."""
    def bad(why: str) -> UsageError:
        return UsageError(f"invalid --model-args for {spec}: {why}")

    if "rngs" in kwargs:
        raise bad("rngs is not an argument to give: mnist-jax passes nnx.Rngs(seed)")
    init = make.__init__ if isinstance(make, type) else make
    this = (None,) if isinstance(make, type) else ()  # ``self`` of a class's __init__
    try:
        signature = inspect.signature(init)
    except ValueError:  # no signature to read: the call itself will say
        signature = None
    if signature is not None:
        rngs = {"rngs": None} if "rngs" in signature.parameters else {}  # else: NNXModel says
        try:
            signature.bind(*this, **rngs, **kwargs)
        except TypeError as e:
            raise bad(f"TypeError: {first_line(e)}") from None
    try:
        check_field_types(make, kwargs, typing.get_type_hints(init))
    except TypeError as e:
        raise bad(f"TypeError: {first_line(e)}") from None
    except Exception:  # noqa: BLE001 - annotations naming what the user never imports
        pass
    return NNXModel.from_callable(functools.partial(make, **kwargs))


def as_model(model: Any, num_models: int = 1) -> Any:
    """The object :func:`mnist_jax.fit` trains, with linen's ``init`` / ``apply``:

    * a linen module as it is (one made by ``nnx.bridge.to_linen`` is trained as the NNX
      class it wraps, so that its dropout gets keys and ``config.json`` can rebuild it);
    * an NNX class or callable called as ``f(rngs=nnx.Rngs(...))``: one model per seed;
    * an NNX instance: one model trained from its own weights (``num_models`` must be 1).
    """
    if isinstance(model, nnx.bridge.ToLinen):
        return NNXModel.from_callable(functools.partial(model.nnx_class, *model.args,
                                                        **dict(model.kwargs)))
    if isinstance(model, (NNXModel, nn.Module)):
        return model
    if isinstance(model, nnx.Module):
        if num_models > 1:
            raise UsageError(f"an NNX model instance ({type(model).__name__}) trains as one "
                             f"model from its own weights, not {num_models}; pass the class "
                             f"(model={type(model).__name__}) to train one per seed and "
                             "learning rate")
        return NNXModel.from_instance(model)
    if _is_subclass(model, nn.Module):
        raise UsageError(f"model={model.__name__} is a linen Module class: pass an instance, "
                         f"model={model.__name__}(...)")
    if _is_subclass(model, nnx.Module) or (callable(model) and not isinstance(model, type)):
        return NNXModel.from_callable(model)
    raise UsageError(f"model: a {type(model).__name__} is neither a flax.linen Module nor an "
                     "NNX Module (or a class or callable building one)")


def describe(model: nn.Module | NNXModel) -> tuple[str, str | None]:
    """``(spec, model_args)`` that rebuild ``model`` where its class can be imported:
    its class's ``module:ClassName`` and its JSON-serialisable constructor fields (for an
    NNX model, the keyword arguments it was built with, when known)."""
    if isinstance(model, NNXModel):
        target, args = model.describe()
        return _spec_of(target), args
    cls = type(model)
    fields = {}
    for name in getattr(cls, "__dataclass_fields__", {}):
        if name in ("parent", "name"):
            continue
        fields[name] = getattr(model, name)
    try:
        args = json.dumps(fields) if fields else None
    except TypeError:
        args = None  # fields that JSON cannot hold: the class alone is recorded
    return _spec_of(cls), args


def _spec_of(obj: Any) -> str:
    """``module:QualName`` of a class or function (its file for a user's file or a
    script's ``__main__``)."""
    source = getattr(sys.modules.get(obj.__module__), "__file__", None)
    where = (source if obj.__module__.startswith("mnist_jax_user_") or obj.__module__ == "__main__"
             else obj.__module__)
    return f"{where}:{obj.__qualname__}"
