"""The run directory: what a training run leaves on disk, written safely.

Layout of ``RUN_DIR``::

    config.json      the TrainConfig (written first; evaluate/predict/resume read it)
    metrics.jsonl    one JSON object per epoch
    results.json     final figures, timings, device, versions, git commit, status
    params.msgpack   the trained parameters (stacked over models when several)
    checkpoints/     orbax checkpoints of the full train state (last k kept)
    tb/              TensorBoard event files

Every file is written atomically (temp file + rename), so an interrupted run
never leaves a half-written file, and nothing of an earlier run is touched
unless ``--resume`` or ``--overwrite`` says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from mnist_jax.atomic import write_atomic
from mnist_jax.config import TrainConfig
from mnist_jax.errors import DataError, UsageError

CURVE_SUFFIX = "_curve"
"""A ``metrics.jsonl`` key ending in this holds points within the epoch (one per stretch of
its steps, e.g. ``train_loss_curve``), not one value per model."""

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "params.msgpack", "checkpoints", "tb",
             "report", "export")


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("mnist-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                "tensorflow-datasets", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit of the code that runs (with ``+dirty`` for local changes), if in git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    """A run folder; create it with :meth:`for_training` or :meth:`open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def for_training(cls, path: str | Path, *, resume: bool = False,
                     overwrite: bool = False) -> "RunDir":
        """Prepare ``path`` for a new run (or a resumed one), refusing to clobber a run."""
        run = cls.check_for_training(path, resume=resume, overwrite=overwrite)
        p = run.path
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-")
            probe.close()
        except OSError as e:
            raise UsageError(f"invalid --out {str(p)!r}: cannot write there "
                             f"({e.strerror or e})") from None
        if overwrite:
            for name in RUN_FILES:
                target = p / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        return run

    @classmethod
    def check_for_training(cls, path: str | Path, *, resume: bool = False,
                           overwrite: bool = False) -> "RunDir":
        """The refusals of :meth:`for_training`, without touching the disk (call it first)."""
        run = cls(path)
        p = run.path
        if p.exists() and not p.is_dir():
            raise UsageError(f"invalid --out {str(p)!r}: it is a file, not a folder")
        if any(a.exists() and not a.is_dir() for a in p.parents):
            raise UsageError(f"invalid --out {str(p)!r}: a parent of it is a file")
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if run.holds_run() and not (resume or overwrite):
            raise UsageError(f"{p} already holds a run: pass --resume to continue it or "
                             "--overwrite to replace it")
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run (for evaluate/predict/report); a one-line error otherwise."""
        run = cls(path)
        if not run.path.is_dir():
            raise UsageError(f"no run folder at {str(run.path)!r}")
        if not (run.path / "config.json").is_file():
            raise UsageError(f"{run.path} is not a run folder (no config.json)")
        return run

    def holds_run(self) -> bool:
        return self.path.is_dir() and any((self.path / n).exists() for n in RUN_FILES)

    # -- paths -----------------------------------------------------------------------------
    @property
    def params_path(self) -> Path:
        return self.path / "params.msgpack"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    # -- reading ---------------------------------------------------------------------------
    def read_config(self) -> TrainConfig:
        path = self.path / "config.json"
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
            return TrainConfig.from_dict(saved)
        except (OSError, ValueError, TypeError, UsageError) as e:  # UsageError: a bad value
            raise DataError(f"{path}: cannot read the run's config ({e})") from None

    def read_results(self) -> dict[str, Any] | None:
        path = self.path / "results.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: damaged results file ({e})") from None

    # -- writing ---------------------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        write_json(self.path / "config.json", config.to_dict())

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` with ``rows`` (used on start and resume)."""
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_results(self, results: dict[str, Any]) -> None:
        results = dict(results, versions=library_versions(), git_commit=git_commit())
        write_json(self.path / "results.json", results)
