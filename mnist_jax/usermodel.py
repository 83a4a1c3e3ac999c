"""Models of the user's: a Flax module named as ``path/to/file.py:ClassName`` or
``package.module:ClassName``, built with optional JSON constructor arguments.

The contract (the one the built-in models follow): ``model.apply(variables, images,
train=...)`` on float32 images ``(B, 28, 28)`` in [0, 1] returns logits ``(B, classes)``.
Collections besides ``params`` (BatchNorm's ``batch_stats``) are carried by the train
state. Every failure to find or build the module is a one-line :class:`UsageError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn

from mnist_jax.errors import UsageError, first_line
from mnist_jax.models import check_field_types


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


def load_model_class(spec: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass that ``spec`` names."""
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
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"invalid --model {spec!r}: {cls_name} is not a flax.linen Module")
    return cls


def build_user_model(spec: str, model_args: str | None = None) -> nn.Module:
    """Instantiate the module ``spec`` names with the JSON object ``model_args``."""
    cls = load_model_class(spec)
    kwargs = json.loads(model_args) if model_args else {}
    try:
        check_field_types(cls, kwargs)
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - TypeError for unknown fields, the user's checks
        raise UsageError(f"invalid --model-args for {spec}: {type(e).__name__}: "
                         f"{first_line(e)}") from None


def describe(model: nn.Module) -> tuple[str, str | None]:
    """``(spec, model_args)`` that rebuild ``model`` where its class can be imported:
    its class's ``module:ClassName`` and its JSON-serialisable constructor fields."""
    cls = type(model)
    source = getattr(sys.modules.get(cls.__module__), "__file__", None)
    where = (source if cls.__module__.startswith("mnist_jax_user_") or cls.__module__ == "__main__"
             else cls.__module__)
    fields = {}
    for name in getattr(cls, "__dataclass_fields__", {}):
        if name in ("parent", "name"):
            continue
        fields[name] = getattr(model, name)
    try:
        args = json.dumps(fields) if fields else None
    except TypeError:
        args = None  # fields that JSON cannot hold: the class alone is recorded
    return f"{where}:{cls.__qualname__}", args
