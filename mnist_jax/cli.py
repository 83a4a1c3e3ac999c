"""The ``mnist-jax`` command line: train, evaluate, predict, summary, report, bench.

Expected failures (bad data, bad flags, refused overwrites) end with one line on
stderr and exit code 1 (data) or 2 (usage) — never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np

# Quieten TensorFlow/absl before anything imports them (tfds prepares data with TF).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mnist_jax.config import MODEL_FIELDS, add_config_flags, config_from_args  # noqa: E402
from mnist_jax.errors import MnistJaxError, UsageError  # noqa: E402

PROG = "mnist-jax"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Parse, join a multi-process run if asked, and hand the run to the library."""
    multi = _init_distributed(args)  # before any other use of JAX
    from mnist_jax.lifecycle import LostProcess, train_run

    config = config_from_args(args)
    try:
        outcome = train_run(config, args.out, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.quiet)
    except LostProcess as e:
        if not multi:
            raise
        _exit_lost_process(e)
    _print_final(outcome.result.config, outcome.summary, outcome.timings,
                 outcome.first_classes)
    print(f"run saved in {outcome.run_dir}")
    return 0


def _init_distributed(args: argparse.Namespace) -> bool:
    """Join a multi-process run if the flags (or JAX_* variables) ask; True if joined."""
    env = os.environ.get
    coordinator = args.coordinator or env("JAX_COORDINATOR_ADDRESS")
    num = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID")
    if not (args.distributed or coordinator or num is not None):
        return False
    if not args.distributed and None in (coordinator, num, pid):
        raise UsageError("a multi-process run needs --coordinator, --num-processes and "
                         "--process-id (or --distributed where JAX detects them)")
    from mnist_jax import parallel
    parallel.initialize_distributed(coordinator, num, pid, heartbeat_timeout=args.heartbeat_timeout,
                                    initialization_timeout=args.init_timeout)
    import jax
    return jax.process_count() > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"invalid ${name} {value!r}: expected an integer") from None


def _exit_lost_process(exc: BaseException) -> None:
    """A collective failed because another process died: say so and exit at once.

    ``os._exit`` skips JAX's shutdown barrier, which would otherwise wait for the
    dead process until the heartbeat timeout and then abort.
    """
    _err(f"error: {exc}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _print_test(config, summary: dict) -> None:
    """Test loss and accuracy: of the model, or of each model, their mean ± std and the
    ensemble's accuracy; with Keras' clipped loss beside ours."""
    if config.num_models == 1:
        print(f"test loss {summary['test_loss']:.4f} (as Keras reports it, probabilities "
              f"clipped at 1e-7: {summary['test_keras_loss']:.4f}), "
              f"test accuracy {summary['test_accuracy']:.4f}")
    else:
        for m in summary["per_model"]:
            print(f"  seed {m['seed']} lr {m['lr']:g}: test loss {m['test_loss']:.4f}, "
                  f"test accuracy {m['test_accuracy']:.4f}")
        print(f"test accuracy {summary['test_accuracy_mean']:.4f} ± "
              f"{summary['test_accuracy_std']:.4f} (min {summary['test_accuracy_min']:.4f}) "
              f"over {config.num_models} models")
        if "ensemble_test_accuracy" in summary:
            print(f"ensemble test accuracy {summary['ensemble_test_accuracy']:.4f} "
                  f"(mean of the {config.num_models} models' probabilities)")


def _print_final(config, summary: dict, timings: dict, classes) -> None:
    _print_test(config, summary)
    secs = timings["epoch_seconds"]
    if secs:
        print(f"compile {timings['compile_seconds']:.1f} s, {len(secs)} epochs in "
              f"{sum(secs):.1f} s ({sorted(secs)[len(secs) // 2]:.2f} s/epoch median), "
              f"total {timings['total_seconds']:.1f} s")
    print("first 30 predicted classes:", " ".join(str(int(c)) for c in classes))


# ---------------------------------------------------------------------------------------
# evaluate / predict / report: read a finished run
# ---------------------------------------------------------------------------------------
def _load_run(run_dir: str):
    from mnist_jax.lifecycle import load_run
    return load_run(run_dir)


def _dataset_for(config, data_dir: str | None):
    from mnist_jax import data as data_lib
    return data_lib.load_dataset(config.dataset, data_dir or config.data_dir)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mnist_jax.run import ensemble_accuracy, summarize_models
    from mnist_jax.training import compile_fns, to_host

    loaded = _load_run(args.run_dir)
    config = loaded.config
    ds = _dataset_for(config, args.data_dir)
    fns = compile_fns(config.batch_size, config.num_models)
    x, y = jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels, jnp.int32)
    m = to_host(fns.evaluate(loaded.state, x, y))
    if config.num_models > 1:
        m["ensemble_accuracy"] = ensemble_accuracy(fns.predict(loaded.state, x), y)
    _print_test(config, summarize_models(config, m))
    return 0


def _is_idx(path: Path) -> bool:
    return "idx" in path.name and path.is_file()


def cmd_predict(args: argparse.Namespace) -> int:
    from mnist_jax import data as data_lib
    from mnist_jax.run import predict

    loaded = _load_run(args.run_dir)
    state = loaded.model_state(0)
    inputs = [Path(p) for p in args.inputs]
    if not inputs:
        images = _dataset_for(loaded.config, args.data_dir).test_images
        return _print_classes(predict(state, images, args.batch_size).argmax(-1), args)
    if all(_is_idx(p) for p in inputs):
        images = np.concatenate([data_lib.read_idx(p) for p in inputs])
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise MnistJaxError(f"{inputs[0]}: IDX images must be N×28×28, got "
                                f"{'×'.join(map(str, images.shape))}")
        return _print_classes(predict(state, images, args.batch_size).argmax(-1), args)
    return _predict_images(state, inputs, args)


def _print_classes(classes, args) -> int:
    if args.json:
        print(json.dumps({"classes": [int(c) for c in classes]}))
    else:
        shown = classes[: args.show] if args.show else classes
        print(" ".join(str(int(c)) for c in shown))
    return 0


def _predict_images(state, inputs: list[Path], args) -> int:
    from tqdm.auto import tqdm

    from mnist_jax.images import iter_image_batches
    from mnist_jax.run import predict

    failures = 0
    bar = tqdm(unit="img", disable=args.quiet or args.json, leave=False, file=sys.stderr)
    for files, batch, errors in iter_image_batches(inputs, batch_size=args.batch_size):
        for path, message in errors:
            failures += 1
            _err(f"skipped {path}: {message}")
        if not len(files):
            continue
        probs = predict(state, batch, args.batch_size)
        for path, p in zip(files, probs):
            top = np.argsort(p)[::-1][:3]
            if args.json:
                print(json.dumps({"file": str(path), "class": int(top[0]),
                                  "top3": [{"class": int(c), "probability": float(p[c])}
                                           for c in top]}))
            else:
                print(f"{path}: {top[0]}  (" + ", ".join(f"{c}: {p[c]:.3f}" for c in top) + ")")
        bar.update(len(files))
    bar.close()
    return 1 if failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    from mnist_jax.report import FASHION_MNIST_CLASSES, write_report
    from mnist_jax.run import predict

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"invalid --out {args.out!r}: it is a file, not a folder")
    loaded = _load_run(args.run_dir)
    run, config = loaded.run, loaded.config
    ds = _dataset_for(config, args.data_dir)
    probs = predict(loaded.model_state(0), ds.test_images)
    names = FASHION_MNIST_CLASSES if config.dataset == "fashion_mnist" else None
    path = write_report(run.path, test_images=ds.test_images,
                        test_labels=np.asarray(ds.test_labels), probs=probs, class_names=names,
                        out_dir=args.out)
    print(f"report written to {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mnist_jax.run import build_model
    from mnist_jax.summary import summary
    print(summary(build_model(config_from_args(args))))
    return 0


def benchmarks_dir() -> Path:
    """The source checkout's ``benchmarks/`` folder, next to this package."""
    return Path(__file__).resolve().parents[1] / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/bench.py`` (not part of the installed package) with the arguments."""
    folder = benchmarks_dir()
    if not (folder / "bench.py").is_file():
        raise UsageError("the benchmark runs from a source checkout of mnist-jax "
                         f"(no {folder / 'bench.py'}): clone the repository and run it there")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import bench
    return bench.main(args.bench_args, prog=f"{PROG} bench")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's model: the draw-a-digit page and the JSON API (the serve extra)."""
    try:
        from mnist_jax.serve import serve
    except ImportError as e:
        missing = (e.name or "a package").partition(".")[0]
        if missing == "mnist_jax":  # our own import broke: not the extra's doing
            raise
        raise UsageError(f"mnist-jax serve needs the serve extra ({missing} is missing): "
                         "pip install 'mnist-jax[serve]'") from None
    serve(args.run_dir, host=args.host, port=args.port, model_index=args.model_index,
          ensemble=args.ensemble, max_body=args.max_body)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's model (or ensemble) as ONNX or StableHLO, checked before it is kept."""
    from mnist_jax.export import export
    from mnist_jax.lifecycle import load_run

    loaded = load_run(args.run_dir)
    done = export(loaded, args.out, format=args.format, model_index=args.model_index,
                  ensemble=args.ensemble, data_dir=args.data_dir)
    n = loaded.config.num_models
    if args.ensemble:
        what = f"the ensemble (mean of the {n} models' probabilities)"
    elif n > 1:
        default = "the default; " if args.model_index is None else ""
        what = (f"model {done.members[0]} of {n} ({default}--model-index I picks another, "
                "--ensemble their mean)")
    else:
        what = "the model"
    size = done.path.stat().st_size
    print(f"{what} written as {args.format} to {done.path} ({size / 1e6:.1f} MB)"
          + (f", metadata in {done.metadata_path}" if done.metadata_path else ""))
    return 0


# ---------------------------------------------------------------------------------------
def _run_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that reads a finished run: RUN_DIR and --data-dir."""
    p = sub.add_parser(name, help=help)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="folder with the IDX archives (default: the run's)")
    return p


def _add_model_choice(p: argparse.ArgumentParser, verb: str) -> None:
    """``--model-index I | --ensemble``: which of a run's models a command uses."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model-index", type=_non_negative_int, metavar="I",
                   help=f"{verb} model I of a run that trained several (default 0)")
    g.add_argument("--ensemble", action="store_true",
                   help=f"{verb} the mean of the probabilities of all the run's models")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The Keras MNIST tutorial in JAX: train, evaluate, "
                     "predict, inspect and benchmark MLP and CNN models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (default: the tutorial's MLP recipe; "
                       "see --recipe)")
    add_config_flags(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("several processes (hosts); see docs/distributed.md")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive_int, metavar="N",
                   help="number of processes (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run with the settings JAX detects "
                        "(Cloud TPU, Slurm, Open MPI)")
    g.add_argument("--heartbeat-timeout", type=_positive_int, default=60, metavar="SECONDS",
                   help="a process silent this long counts as dead and the run fails (default 60)")
    g.add_argument("--init-timeout", type=_positive_int, default=300, metavar="SECONDS",
                   help="how long to wait for all processes to join (default 300)")
    p.set_defaults(func=cmd_train)

    p = _run_parser(sub, "evaluate", "test loss and accuracy of a trained run")
    p.set_defaults(func=cmd_evaluate)

    p = _run_parser(sub, "predict", "predicted classes for the test set, IDX files or images")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="IDX image files, image files or folders (default: the test set)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--show", type=_non_negative_int, default=30,
                   help="classes shown for the test set / IDX input (0: all; default 30)")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("summary", help="layers, output shapes and parameter counts of a model")
    add_config_flags(p, only=MODEL_FIELDS, title="the model (as mnist-jax train builds it)")
    p.set_defaults(func=cmd_summary)

    p = _run_parser(sub, "report", "learning curves, confusion matrix and worst errors")
    p.add_argument("--out", help="folder for the figures (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    # No flags of its own ('+' is its only option prefix, so "--quick" or "-h" is no option
    # here): every argument goes to benchmarks/bench.py's parser, imported only when run.
    p = sub.add_parser("bench", add_help=False, prefix_chars="+",
                       help="benchmark MLP and CNN training against Keras 3 and PyTorch and the "
                       "matmul ceiling; writes benchmarks/results/DEVICE.{json,md} (from a "
                       "source checkout; 'mnist-jax bench --help' for its flags)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="a draw-a-digit page and a JSON API (POST /predict) over "
                       "a trained run (needs the serve extra; see docs/serve.md)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the API "
                        "has no authentication)")
    p.add_argument("--port", type=_non_negative_int, default=8000,
                   help="port (default 8000; 0: one the system chooses, printed)")
    _add_model_choice(p, "serve")
    p.add_argument("--max-body", type=_positive_int, default=10_000_000, metavar="BYTES",
                   help="larger request bodies are refused with 413 (default 10000000)")
    p.set_defaults(func=cmd_serve)

    p = _run_parser(sub, "export", "write a trained run's model (or ensemble) as an ONNX or "
                    "StableHLO file that runs without mnist-jax (ONNX needs the export extra; "
                    "see docs/export.md)")
    p.add_argument("--format", required=True, choices=("onnx", "stablehlo"),
                   help="onnx (for onnxruntime) or stablehlo (jax.export, for bare JAX)")
    p.add_argument("--out", metavar="FILE",
                   help="the file to write (default: RUN_DIR/export/model.FORMAT)")
    _add_model_choice(p, "export")
    p.set_defaults(func=cmd_export)

    return parser


def _int_at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err(f"warning: {' '.join(str(message).split())}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mnist-jax`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    previous_hook, previous_excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    sys.excepthook = _quiet_excepthook(previous_excepthook)  # tensorstore callbacks: PyErr_Print
    asyncio_log = logging.getLogger("asyncio")  # orbax's abandoned reads, see _quiet_unraisable
    previous_level = asyncio_log.level
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # a warning is one line too, not "file:line: …"
            warnings.showwarning = _show_warning
            return args.func(args)
    except MnistJaxError as e:
        _err(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return e.exit_code
    except OSError as e:  # the machine, not the input: disk full, read-only, vanished
        _err(f"error: {' '.join(str(e).split()) or type(e).__name__}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        gc.collect()  # abandoned tasks report when collected: now, while quietened
        sys.unraisablehook, sys.excepthook = previous_hook, previous_excepthook
        asyncio_log.setLevel(previous_level)


def _loop_closed(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_excepthook(previous):
    def hook(exc_type, exc, tb) -> None:
        if not _loop_closed(exc):
            previous(exc_type, exc, tb)
    return hook


def _quiet_unraisable(previous):
    """An unraisable-exception hook that drops orbax's "Event loop is closed": tensorstore
    reads abandoned by a failed checkpoint restore complete after orbax closed its event
    loop, and their callbacks would print a traceback under the one-line error (their
    siblings' "Task exception was never retrieved" go to the quietened asyncio logger)."""
    def hook(unraisable) -> None:
        if not _loop_closed(unraisable.exc_value):
            previous(unraisable)
    return hook


def console() -> NoReturn:
    """The console script: :func:`main`, with the quiet hooks kept until the process exits
    and XLA's compilation cache in the cache folder (:mod:`mnist_jax.xla_cache`), then
    :func:`exit_now` with its exit code.

    Reads that a failed checkpoint restore abandoned can complete after ``main``
    returns, while the interpreter shuts down; in a process of our own the hooks
    stay, so nothing is printed under the one-line error.
    """
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    sys.excepthook = _quiet_excepthook(sys.excepthook)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    from mnist_jax.xla_cache import enable_compilation_cache
    enable_compilation_cache()  # this process's own setting: main() may run inside a user's
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process as the interpreter would, less its teardown of every object.

    What a normal exit does that anyone can see is kept, in its order: idle executors
    are shut down and other (non-daemon) threads joined, the ``atexit`` handlers run (log
    and TensorBoard flushes, JAX's pending effects, temporary folders), the standard
    streams are flushed. What is skipped is the interpreter freeing its modules and XLA's
    client one object at a time: after a training run that takes most of a second and
    writes nothing. Every file of a command is complete and closed before
    ``main`` returns.
    """
    # The first two steps of Py_FinalizeEx, by the functions it calls (private, no public
    # equivalent); the rest of it is the teardown skipped.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    console()
