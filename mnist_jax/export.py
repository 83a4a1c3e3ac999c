"""A trained run as a file that runs without mnist-jax: ONNX or serialized StableHLO.

:func:`export` writes one model of a run (or the mean of all its models' probabilities,
the ensemble ``results.json`` scores) as a function of the images as :func:`mnist_jax.predict`
takes them, uint8 ``(N, 28, 28)`` with white ink on black, to float32 class probabilities
``(N, 10)``; ``N`` is symbolic, so one file serves any batch.

* ``stablehlo``: :func:`jax.export.export` serialized, lowered for CPU and CUDA (and TPU
  where this JAX can lower for it); ``jax.export.deserialize(data).call(images)`` runs it
  in a process with bare JAX. Its metadata is a JSON file beside it (``FILE.json``).
* ``onnx``: converted by jax2onnx (the ``export`` extra), which turns a jaxpr's primitives
  into ONNX operators and keeps a symbolic batch dimension; onnxruntime runs it. Its
  metadata is the model's ``metadata_props``.

The model is reached only through the train state's contract
(``state.apply_fn(state.variables, x, train=False)`` → logits), so linen and NNX models of
the user's export as the built-in ones do. The function is traced to a jaxpr first and the
converter is handed the jaxpr's primitives: what it sees is what JAX computes, not the
framework calls that produced it (its replacements of Flax layers are bypassed).

Every file is checked before it is kept: run on the test digits (or, without the data, on
a deterministic batch of digits) it must give the class that JAX gives on every digit and
probabilities within :data:`TOLERANCE`; otherwise it is removed and :class:`DataError` is
raised. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.atomic import atomic_path, write_atomic
from mnist_jax.errors import DataError, MnistJaxError, UsageError, first_line

__all__ = ["FORMATS", "TOLERANCE", "Exported", "export", "default_path", "probability_fn"]

FORMATS = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
"""The formats :func:`export` writes and their file suffixes."""

TOLERANCE = 1e-5
"""Largest difference allowed between a written file's probabilities and JAX's."""

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
OPSET = 17
"""The ONNX opset the files use: every operator these models need is in it, and runtimes
from 2022 on read it (onnxruntime 1.13 and later, its web build, TensorRT, OpenVINO); the
converter's own default (23) needs a much newer runtime."""
PLATFORMS = ("cpu", "cuda", "tpu")
"""What a StableHLO file is lowered for; a platform this JAX cannot lower for is left out."""

_CHECK_DIGITS = 1000
_EXTRA = "pip install 'mnist-jax[export]'"


@dataclasses.dataclass
class Exported:
    """What :func:`export` wrote and how its check went."""

    path: Path
    format: str
    members: list[int]
    metadata: dict[str, str]
    metadata_path: Path | None
    check: str
    max_abs_diff: float
    checked_digits: int


# ---------------------------------------------------------------------------------------
# The function exported
# ---------------------------------------------------------------------------------------
def probability_fn(states: list[Any]) -> Callable[[jax.Array], jax.Array]:
    """uint8 images (N, 28, 28) → float32 probabilities (N, 10): of one model's state, or
    the mean of several models' probabilities (the run's ensemble)."""
    members = [(s.apply_fn, s.variables) for s in states]

    def probabilities(images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 255.0  # as training feeds the model
        probs = [jax.nn.softmax(apply(v, x, train=False).astype(jnp.float32), -1)
                 for apply, v in members]
        return probs[0] if len(probs) == 1 else sum(probs) / len(probs)

    return probabilities


def _inference_state(loaded, state):
    """``state`` with a built-in CNN called through XLA's convolution: its fused training
    implementation computes the same function from the same parameters, and a converter
    sees a convolution as one operator instead of its im2col pieces."""
    from mnist_jax.models import BNCNN, CNN
    model = loaded.model
    if isinstance(model, (CNN, BNCNN)) and model.impl != "xla":
        return state.replace(apply_fn=model.clone(impl="xla").apply)
    return state


def _input_spec() -> jax.ShapeDtypeStruct:
    (n,) = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((n, 28, 28), jnp.uint8)


def _trace(fn: Callable, spec: jax.ShapeDtypeStruct):
    """``fn``'s closed jaxpr for a symbolic batch size; a model that needs a concrete one
    (Python arithmetic on ``x.shape[0]``) is refused in one line."""
    try:
        return jax.make_jaxpr(fn)(spec)
    except Exception as e:  # noqa: BLE001 - any failure of the user's code while tracing
        raise UsageError("cannot export: the model does not trace for a batch of symbolic "
                         f"size N ({type(e).__name__}: {first_line(e)})") from None


def _primitives(jaxpr) -> set[str]:
    """Every primitive of ``jaxpr`` and of the jaxprs nested in its equations."""
    from jax.extend.core import subjaxprs
    names = {e.primitive.name for e in jaxpr.eqns}
    for sub in subjaxprs(jaxpr):
        names |= _primitives(sub)
    return names


def _unsupported(fmt: str, names) -> UsageError:
    ops = ", ".join(sorted(names))
    return UsageError(f"the model uses {ops}, which the {fmt} format cannot express; "
                      "nothing was written")


# ---------------------------------------------------------------------------------------
# StableHLO
# ---------------------------------------------------------------------------------------
def _stablehlo_bytes(fn: Callable) -> tuple[bytes, list[str]]:
    spec = _input_spec()
    callbacks = {p for p in _primitives(_trace(fn, spec).jaxpr) if "callback" in p}
    if callbacks:  # Python called back at run time: nothing a serialized program can hold
        raise _unsupported("stablehlo", callbacks)
    platforms = list(PLATFORMS)
    while True:
        try:
            exp = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
            return exp.serialize(), platforms
        except Exception as e:  # noqa: BLE001 - which lowering fails is only known by trying
            if len(platforms) > 2:  # TPU is optional: only CPU and CUDA are promised
                platforms.pop()
                continue
            raise UsageError(f"cannot export to stablehlo: {first_line(e)}") from None


def _run_stablehlo(path: Path, images: np.ndarray) -> np.ndarray:
    exp = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exp.call(jnp.asarray(images)))


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------
def _import_onnx():
    try:
        import onnxruntime
        from jax2onnx import to_onnx
    except ImportError as e:
        raise UsageError(f"ONNX export needs jax2onnx and onnxruntime ({e.name} is not "
                         f"installed): {_EXTRA}") from None
    return to_onnx, onnxruntime


_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
            "remat": "jaxpr", "checkpoint": "jaxpr"}
"""Calls whose body is evaluated in place: inference needs neither their derivative rules
nor a function boundary, and the converter then sees the primitives inside."""


def _eval_jaxpr(jaxpr, consts, *args) -> list[Any]:
    """Evaluate ``jaxpr`` primitive by primitive (under the converter's trace), nested calls
    inlined and pooling windows put in the layout ONNX pools over."""
    from jax.extend.core import Literal
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars])
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, ins: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    if name in _INLINED and _INLINED[name] in eqn.params:
        body = eqn.params[_INLINED[name]]
        inner, consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
        return _eval_jaxpr(inner, consts, *ins)
    if name == "reduce_window_max":
        return [_max_pool(ins[0], **eqn.params)]
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        ins = [*subfuns, *ins]
    out = eqn.primitive.bind(*ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _max_pool(x, *, window_dimensions, window_strides, padding, base_dilation,
              window_dilation):
    """``reduce_window_max`` with the pooled axes last and the others merged into one.

    The converter pools over every axis of the operand, and onnxruntime pools over at most
    three: Flax's NHWC pooling (window 1 on batch and channels) is four. Merging the
    untouched axes leaves three, the first with a window of one: the same maxima.
    """
    params = dict(window_dimensions=window_dimensions, window_strides=window_strides,
                  padding=padding, base_dilation=base_dilation, window_dilation=window_dilation)
    pooled = [i for i in range(x.ndim)
              if (window_dimensions[i], window_strides[i], tuple(padding[i]), base_dilation[i],
                  window_dilation[i]) != (1, 1, (0, 0), 1, 1)]
    kept = [i for i in range(x.ndim) if i not in pooled]
    if not kept or len(pooled) > 2:
        return jax.lax.reduce_window_max_p.bind(x, **params)
    y = x.transpose(kept + pooled)
    lead = y.shape[:len(kept)]
    y = y.reshape((math.prod(lead), *y.shape[len(kept):]))

    def pick(values, unit):
        return (unit, *(values[i] for i in pooled))

    y = jax.lax.reduce_window_max_p.bind(
        y, window_dimensions=pick(window_dimensions, 1), window_strides=pick(window_strides, 1),
        padding=pick([tuple(p) for p in padding], (0, 0)),
        base_dilation=pick(base_dilation, 1), window_dilation=pick(window_dilation, 1))
    y = y.reshape((*lead, *y.shape[1:]))
    return y.transpose(np.argsort(kept + pooled).tolist())


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """The converter's and its IR library's warnings silenced: they log notes about
    intermediate values to stderr, where a command prints one line per outcome."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_bytes(fn: Callable, metadata: dict[str, str], name: str) -> bytes:
    to_onnx, _ = _import_onnx()
    spec = _input_spec()
    closed = _trace(fn, spec)

    def traced(images):
        return _eval_jaxpr(closed.jaxpr, closed.consts, images)[0]

    try:
        with _quiet_converter():
            model = to_onnx(traced, [spec], model_name=name, opset=OPSET,
                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    except NotImplementedError as e:
        missing = re.search(r"primitive '([^']+)'", str(e))
        if missing:
            raise _unsupported("onnx", [missing.group(1)]) from None
        raise UsageError(f"cannot export to onnx: {first_line(e)}") from None
    except MnistJaxError:
        raise
    except Exception as e:  # noqa: BLE001 - a converter failure is one line, not a traceback
        raise UsageError(f"cannot export to onnx: {type(e).__name__}: {first_line(e)}") from None
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = (f"{INPUT_NAME}: uint8 (N, 28, 28), white ink on black as MNIST; "
                        f"{OUTPUT_NAME}: float32 (N, 10) class probabilities")
    return model.SerializeToString()


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    _, ort = _import_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


RUNNERS: dict[str, Callable[[Path, np.ndarray], np.ndarray]] = {
    "onnx": _run_onnx, "stablehlo": _run_stablehlo}
"""How the export check runs a written file of each format: as its users will, by
onnxruntime or by ``jax.export.deserialize``."""


# ---------------------------------------------------------------------------------------
# The run, the metadata and the check
# ---------------------------------------------------------------------------------------
def _members(config, model_index: int | None, ensemble: bool) -> list[int]:
    n = config.num_models
    if ensemble:
        if model_index is not None:
            raise UsageError("--model-index and --ensemble exclude each other")
        if n == 1:
            raise UsageError("--ensemble needs a run of several models (--seeds 0,1,2); "
                             "this run trained one")
        return list(range(n))
    i = 0 if model_index is None else model_index
    if not 0 <= i < n:
        raise UsageError(f"invalid --model-index {i}: the run trained {n} model(s), "
                         f"0..{n - 1}")
    return [i]


def default_path(run_dir: Path, fmt: str, members: list[int], num_models: int) -> Path:
    """``RUN_DIR/export/model.onnx`` (one model), ``model-I.onnx`` (model I of several),
    ``ensemble.onnx``."""
    if len(members) > 1:
        stem = "ensemble"
    else:
        stem = "model" if num_models == 1 else f"model-{members[0]}"
    return run_dir / "export" / f"{stem}{FORMATS[fmt]}"


def _check_out(path: Path) -> None:
    """Refuse an ``--out`` that cannot be written before anything is computed."""
    if path.is_dir():
        raise UsageError(f"invalid --out {str(path)!r}: it is a folder; name the file")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"invalid --out {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is None or not _writable(folder):
        raise UsageError(f"invalid --out {str(path)!r}: cannot write in {str(folder)!r}")


def _writable(folder: Path) -> bool:
    import os
    return os.access(folder, os.W_OK | os.X_OK)


def _accuracy(results: dict, config, members: list[int]) -> float | None:
    if len(members) > 1:
        return results.get("ensemble_test_accuracy")
    acc = results.get("test_accuracy")
    return acc[members[0]] if isinstance(acc, list) else acc


def _metadata(loaded, members: list[int], fmt: str) -> dict[str, str]:
    from mnist_jax import __version__
    from mnist_jax.rundir import git_commit
    config = loaded.config
    results = loaded.run.read_results() or {}
    grid = config.model_grid()
    which = (f"ensemble: mean probabilities of models {members[0]}..{members[-1]}"
             if len(members) > 1 else f"model {members[0]} of {config.num_models}")
    meta = {
        "producer": "mnist-jax", "mnist_jax_version": __version__, "format": fmt,
        "model": config.model, "model_args": config.model_args or "",
        "recipe": config.recipe, "dataset": config.dataset, "members": which,
        "seeds_lrs": json.dumps([grid[i] for i in members]),
        "test_accuracy": json.dumps(_accuracy(results, config, members)),
        "trained_commit": str(results.get("git_commit")),
        "export_commit": str(git_commit()), "jax_version": jax.__version__,
        "input": f"{INPUT_NAME}: uint8 (N, 28, 28), white ink on black as MNIST",
        "output": f"{OUTPUT_NAME}: float32 (N, 10) class probabilities",
    }
    return meta


def check_digits(config, data_dir: str | None, log: Callable[[str], None] = print
                 ) -> tuple[np.ndarray, str]:
    """The digits an export is checked on and their name: the run's test set when its data
    can be read, else (said in ``log``) a deterministic batch of synthetic digits."""
    from mnist_jax import data as data_lib
    try:
        ds = data_lib.load_dataset(config.dataset, data_dir or config.data_dir)
        return np.asarray(ds.test_images), "test digits"
    except DataError as e:
        # The run folder keeps no digits of its own, so the fallback is made here.
        log(f"no test data ({first_line(e)}): the check runs on {_CHECK_DIGITS} synthetic "
            "digits instead (the run folder stores no digits of its own)")
        images, _ = data_lib.synthetic_digits(np.random.default_rng(0), _CHECK_DIGITS)
        return images, "synthetic digits"


def _reference(states: list[Any], images: np.ndarray) -> np.ndarray:
    from mnist_jax.run import predict
    probs = [predict(s, images) for s in states]
    return probs[0] if len(probs) == 1 else np.mean(probs, axis=0)


def compare(got: np.ndarray, want: np.ndarray, what: str) -> tuple[str, float]:
    """One line saying how ``got`` (a file's probabilities) agrees with JAX's ``want``;
    :class:`DataError` if a class differs or a probability is more than
    :data:`TOLERANCE` apart."""
    got = np.asarray(got)
    if got.shape != want.shape:
        raise DataError(f"the written file gives shape {got.shape} for {want.shape[0]} "
                        f"{what}, expected {want.shape}")
    same = int(np.sum(got.argmax(-1) == want.argmax(-1)))
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    line = (f"same class on {same}/{len(want)} {what}, max |p - p_jax| {diff:.1g}")
    if same != len(want) or not diff <= TOLERANCE:
        raise DataError(f"the written file disagrees with JAX: {line} (allowed: every class, "
                        f"{TOLERANCE:g}); nothing was kept")
    return line, diff


def _load(run):
    from mnist_jax.lifecycle import LoadedRun, load_run
    return run if isinstance(run, LoadedRun) else load_run(run)


def export(run, path: str | Path | None = None, *, format: str, model_index: int | None = None,
           ensemble: bool = False, data_dir: str | None = None,
           check_images: np.ndarray | None = None, log: Callable[[str], None] = print
           ) -> Exported:
    """Write ``run`` (a :func:`mnist_jax.load_run` result or a run folder) as ``format``
    ("onnx" or "stablehlo") to ``path`` (default ``RUN_DIR/export/model.FORMAT``).

    ``model_index`` picks one model of a run of several (default 0); ``ensemble`` exports
    the mean of all its models' probabilities as one file. The written file is run on the
    test digits (``data_dir``, default the run's), or on ``check_images`` when given, and
    kept only if it agrees with JAX (:func:`compare`). Raises :class:`UsageError` for a
    request that cannot be met (nothing is written) and :class:`DataError` for a file that
    disagrees (it is removed).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: choose {' or '.join(FORMATS)}")
    if format == "onnx":
        _import_onnx()
    loaded = _load(run)
    members = _members(loaded.config, model_index, ensemble)
    target = Path(path) if path is not None else default_path(
        loaded.run.path, format, members, loaded.config.num_models)
    _check_out(target)
    states = [loaded.model_state(i) for i in members]
    fn = probability_fn([_inference_state(loaded, s) for s in states])
    metadata = _metadata(loaded, members, format)
    if format == "stablehlo":
        data, platforms = _stablehlo_bytes(fn)
        metadata["platforms"] = ",".join(platforms)
    else:
        data = _onnx_bytes(fn, metadata, target.stem)
    if check_images is not None:
        images, what = np.asarray(check_images, np.uint8), "digits given"
    else:
        images, what = check_digits(loaded.config, data_dir, log)
    meta_path = target.with_name(target.name + ".json") if format == "stablehlo" else None
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
        line, diff = compare(RUNNERS[format](tmp, images), _reference(states, images), what)
        if meta_path is not None:
            write_atomic(meta_path, json.dumps(metadata, indent=2) + "\n")
    log(f"checked: {line}")
    return Exported(target, format, members, metadata, meta_path, line, diff, len(images))
