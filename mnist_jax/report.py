"""Figures and a Markdown report for a finished training run.

Pure numpy + matplotlib (object-oriented API with the Agg canvas, so no global
pyplot state and no display is needed). A run directory holds ``metrics.jsonl``
(one JSON object per epoch) and optionally ``results.json``; values that vary
per model (several seeds / learning rates trained together) are lists with one
entry per model, and such rows carry ``models: [{"seed": .., "lr": ..}, ...]``.

Every file is written atomically: it is saved under a temporary name in the
same folder and then moved into place with :func:`os.replace`, so an
interrupted report never leaves a half-written PNG or Markdown file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mnist_jax.atomic import atomic_path
from mnist_jax.errors import DataError
from mnist_jax.rundir import CURVE_SUFFIX

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
TABLE_LAST_EPOCHS = 10  # longer runs show only the last epochs in report.md

_SPLITS = (("train", "C0"), ("val", "C1"), ("test", "C2"))
_DPI = 110


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse ``run_dir/metrics.jsonl`` into one dict per epoch (blank lines skipped).

    Raises :class:`DataError` if the file is missing or empty, or if a line is not
    a JSON object with an ``epoch`` (the message gives the line number).
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no {METRICS_FILE} in {run_dir}: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise DataError(f"{path}, line {lineno}: expected a JSON object with an integer 'epoch'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no epochs")
    return rows


def _read_results(run_dir: Path) -> dict[str, Any]:
    """Return ``results.json`` as a dict, ``{}`` if absent; DataError if damaged."""
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(results, dict):
        raise DataError(f"{path}: expected a JSON object")
    return results


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` (used when results.json has no config); ``{}`` if unreadable."""
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then move it into place."""
    with atomic_path(path, durable=False) as tmp:
        write(tmp)
    return path


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically."""
    FigureCanvasAgg(fig)
    return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))


def _as_float_array(value: Any) -> np.ndarray:
    """A scalar or list metric value as a 1-D float array (``None`` becomes NaN)."""
    return np.atleast_1d(np.asarray(value, dtype=float))


def _stats(values: np.ndarray) -> tuple[float, float, float, float]:
    """NaN-ignoring (mean, std, min, max) of a 1-D array; all NaN if nothing is finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (float(np.nanmean(values)), float(np.nanstd(values)),
                float(np.nanmin(values)), float(np.nanmax(values)))


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Epochs and an (epochs, models) array for ``key``; None if no row has it."""
    epochs, values = [], []
    for row in rows:
        if row.get(key) is None:
            continue
        epochs.append(row["epoch"])
        values.append(_as_float_array(row[key]))
    if not epochs:
        return None
    width = max(len(v) for v in values)
    table = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        table[i, : len(v)] = v
    return np.asarray(epochs), table


def _curve_series(rows: Sequence[dict[str, Any]], key: str
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Fractional epochs (the middle of each stretch of steps) and a (points, models) array
    for a within-epoch curve such as ``train_loss_curve``; None unless every row has it
    (runs written before the curves were recorded plot their epoch means instead)."""
    if not rows or any(row.get(key) is None for row in rows):
        return None
    xs, blocks = [], []
    for row in rows:
        table = np.asarray(row[key], dtype=float)
        table = table[None] if table.ndim == 1 else table  # (models, points)
        k = table.shape[1]
        xs.append(row["epoch"] - 1 + (np.arange(k) + 0.5) / k)
        blocks.append(table.T)
    return np.concatenate(xs), np.concatenate(blocks)


def _num_models(rows: Sequence[dict[str, Any]], results: dict[str, Any] | None = None) -> int:
    """How many models the run trained together (1 for a plain run)."""
    n = 1
    for row in rows:
        if isinstance(row.get("models"), list):
            n = max(n, len(row["models"]))
        for key, value in row.items():
            if key.endswith(CURVE_SUFFIX):  # points within the epoch, not models
                continue
            if isinstance(value, list) and value and not isinstance(value[0], dict):
                n = max(n, len(value))
    if results:
        if isinstance(results.get("per_model"), list):
            n = max(n, len(results["per_model"]))
        if isinstance(results.get("test_accuracy"), list):
            n = max(n, len(results["test_accuracy"]))
    return n


def _default_class_names(num_classes: int, dataset: str = "") -> tuple[str, ...]:
    """Fashion-MNIST names for a Fashion dataset, digits for 10 classes, else numbers."""
    if num_classes == 10 and "fashion" in dataset.lower():
        return FASHION_MNIST_CLASSES
    return tuple(str(c) for c in range(num_classes))


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    names = _default_class_names(num_classes) if class_names is None else tuple(class_names)
    if len(names) != num_classes:
        raise DataError(f"{len(names)} class names given for {num_classes} classes")
    return names


# ----------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------


def plot_learning_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot loss and accuracy vs epoch (train, and val/test where present) to a PNG.

    Training is drawn within each epoch from its ``train_*_curve`` stretches (so a
    one-epoch run has a curve too), at the epoch's end from its mean for older runs;
    validation and test are measured after each epoch. With several models each curve
    is the mean over models and the shaded band spans the min–max over models (the
    legend says so). Returns ``path``.
    """
    return _save_figure(learning_curves_figure(rows), path)


def learning_curves_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """The figure :func:`plot_learning_curves` saves: loss (left) and accuracy (right)."""
    if not rows:
        raise DataError("no metrics rows to plot")
    n_models = _num_models(rows)
    epoch_numbers = sorted({int(r["epoch"]) for r in rows})
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        drawn = False
        many_epochs = len(rows) > 30
        within = _curve_series(rows, f"train_{metric}{CURVE_SUFFIX}")
        for split, color in _SPLITS:
            series = within if split == "train" and within else _series(rows, f"{split}_{metric}")
            if series is None:
                continue
            epochs, table = series
            stats = np.array([_stats(r) for r in table])
            mean, lo, hi = stats[:, 0], stats[:, 2], stats[:, 3]
            label = split if table.shape[1] == 1 else f"{split} (mean)"
            # a lone point (the test set read once, after the last epoch) needs its marker
            dots = len(epochs) == 1 or not many_epochs and not (split == "train" and within)
            ax.plot(epochs, mean, color=color, label=label,
                    marker="o" if dots else None, markersize=3.5, linewidth=1.6)
            if table.shape[1] > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn = True
        if n_models > 1:
            ax.legend(handles=[*ax.get_legend_handles_labels()[0],
                               Patch(color="0.6", alpha=0.4, label=f"band: min–max of {n_models} models")])
        elif drawn:
            ax.legend()
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric.capitalize()} per epoch")
        if len(epoch_numbers) <= 12:  # few epochs: one tick each (also right for a single epoch)
            ticks = ([epoch_numbers[0] - 1] if within else []) + epoch_numbers
            margin = 0.05 if within else 0.5
            ax.set_xticks(ticks)
            ax.set_xlim(ticks[0] - margin, ticks[-1] + margin)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.35)
    if n_models > 1:
        fig.suptitle(f"Learning curves of {n_models} models")
    return fig


# ----------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------


def confusion_matrix(labels: Any, predicted: Any, num_classes: int = 10) -> np.ndarray:
    """Counts ``cm[true, predicted]`` as an int64 (num_classes, num_classes) array."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    predicted = np.asarray(predicted).astype(np.int64).ravel()
    if labels.shape != predicted.shape:
        raise DataError(f"{labels.size} labels but {predicted.size} predictions")
    for name, arr in (("label", labels), ("prediction", predicted)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(f"a {name} is outside 0..{num_classes - 1}")
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def plot_confusion_matrix(cm: np.ndarray, path: str | os.PathLike[str],
                          class_names: Sequence[str] | None = None) -> Path:
    """Heatmap of a confusion matrix (rows true, columns predicted) with counts in cells."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DataError(f"a confusion matrix must be square, got shape {cm.shape}")
    n = cm.shape[0]
    names = _check_class_names(class_names, n)
    long_names = max((len(s) for s in names), default=0) > 3
    fig = Figure(figsize=(8, 7) if long_names else (7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="count")
    total = int(cm.sum())
    accuracy = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"Confusion matrix ({total} examples, accuracy {accuracy:.2%})")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_xticks(range(n), names, rotation=45 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_yticks(range(n), names)
    threshold = cm.max() / 2 if cm.size else 0
    fontsize = 8 if n <= 10 else 6
    for i in range(n):
        for j in range(n):
            value = cm[i, j]
            color = "white" if value > threshold else ("0.65" if value == 0 else "black")
            ax.text(j, i, f"{value:g}", ha="center", va="center", color=color, fontsize=fontsize)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------
# Most confident errors
# ----------------------------------------------------------------------------


def most_confident_errors(probs: Any, labels: Any, k: int = 25) -> np.ndarray:
    """Indices of at most ``k`` misclassified examples, most confident wrong ones first.

    Sorted by the probability the model gave its (wrong) predicted class,
    descending; ties keep the original order.
    """
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise DataError(f"probs of shape {probs.shape} do not match {labels.size} labels")
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return wrong[order][: max(k, 0)]


def _as_images(images: Any) -> np.ndarray:
    """Images as (N, H, W): accepts (N, H, W), (N, H, W, 1) or flat (N, 784)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    elif images.ndim == 2 and math.isqrt(images.shape[1]) ** 2 == images.shape[1]:
        side = math.isqrt(images.shape[1])
        images = images.reshape(-1, side, side)
    if images.ndim != 3:
        raise DataError(f"expected images of shape (N, 28, 28), got {images.shape}")
    return images


def plot_error_grid(images: Any, labels: Any, probs: Any, indices: Any,
                    path: str | os.PathLike[str],
                    class_names: Sequence[str] | None = None) -> Path:
    """Grid (5×5 for 25) of the chosen test images, upright, titled "true 7 → pred 2 (0.99)".

    ``indices`` select rows of ``images``/``labels``/``probs``; images may be
    uint8 (0–255) or float (0–1) and are drawn dark ink on white, unsmoothed.
    """
    images = _as_images(images)
    labels = np.asarray(labels).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=float)
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if not (len(images) == labels.size == len(probs)):
        raise DataError(f"{len(images)} images, {labels.size} labels and {len(probs)} prob rows differ")
    names = _check_class_names(class_names, probs.shape[1])
    vmax = 255.0 if images.dtype == np.uint8 or (images.size and images.max() > 1.0) else 1.0
    two_lines = max(len(s) for s in names) > 3
    n = indices.size
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.9 * cols + 0.2, (2.25 if two_lines else 2.0) * rows + 0.4),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, idx in zip(axes, indices):
        pred = int(probs[idx].argmax())
        ax.imshow(images[idx], cmap="gray_r", vmin=0, vmax=vmax, origin="upper",
                  interpolation="nearest", resample=False)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("0.8")
        sep = "\n" if two_lines else " "
        ax.set_title(f"true {names[labels[idx]]}{sep}→ pred {names[pred]} ({probs[idx, pred]:.2f})",
                     fontsize=8)
    if n == 0:
        axes[0].text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
    else:
        fig.suptitle("Most confident errors", fontsize=10)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------
# Markdown report
# ----------------------------------------------------------------------------


def _fmt(value: Any, pct: bool = False) -> str:
    """Format a scalar (or mean ± std of a list) for a Markdown table."""
    if value is None:
        return "–"
    arr = _as_float_array(value)
    mean, std, _, _ = _stats(arr)
    if math.isnan(mean):
        return "nan"
    one = (lambda x: f"{x:.2%}") if pct else (lambda x: f"{x:.4f}")
    return one(mean) if arr.size == 1 else f"{one(mean)} ± {one(std)}"


def _pm(mean: float | None, std: float | None, pct: bool = False) -> str:
    """``mean ± std`` (as percentages if ``pct``); "–" when the mean is unknown."""
    if mean is None or not math.isfinite(mean):
        return "–"
    std = float("nan") if std is None else std
    return f"{mean:.2%} ± {std:.2%}" if pct else f"{mean:.4f} ± {std:.4f}"


def _pct(value: Any) -> str:
    """A fraction as a percentage; "–" when missing, not a number or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.2%}"


def _summary_lines(rows: list[dict[str, Any]], results: dict[str, Any], n_models: int) -> list[str]:
    """The summary table: test loss/accuracy; for several models their mean ± std, the
    lowest model's accuracy, the ensemble's accuracy (when results.json records it) and a
    per-model table."""
    last = rows[-1]
    loss = results.get("test_loss", last.get("test_loss"))
    acc = results.get("test_accuracy", last.get("test_accuracy"))
    lines = ["## Summary", "", "| metric | value |", "|---|---|",
             f"| epochs | {last['epoch']} |"]
    if n_models > 1:
        acc_arr = _as_float_array(acc) if acc is not None else np.array([np.nan])
        mean = results.get("test_accuracy_mean", _stats(acc_arr)[0])
        std = results.get("test_accuracy_std", _stats(acc_arr)[1])
        loss_arr = _as_float_array(loss) if loss is not None else np.array([np.nan])
        loss_mean = results.get("test_loss_mean", _stats(loss_arr)[0])
        loss_std = results.get("test_loss_std", _stats(loss_arr)[1])
        low = results.get("test_accuracy_min", _stats(acc_arr)[2])
        lines += [f"| models | {n_models} |",
                  f"| test accuracy (mean ± std over {n_models} models) | {_pm(mean, std, True)} |",
                  f"| test accuracy (min over {n_models} models) | {_pct(low)} |"]
        if "ensemble_test_accuracy" in results:  # runs from before ensembles lack it
            lines.append(f"| ensemble test accuracy (mean of the {n_models} models' "
                         f"probabilities) | {_pct(results['ensemble_test_accuracy'])} |")
        lines.append(f"| test loss (mean ± std) | {_pm(loss_mean, loss_std)} |")
    else:
        lines += [f"| test loss | {_fmt(loss)} |", f"| test accuracy | {_fmt(acc, pct=True)} |"]
    if n_models > 1:
        per_model = results.get("per_model")
        if not isinstance(per_model, list):
            models = last.get("models") or [{} for _ in range(n_models)]
            losses = list(_as_float_array(loss)) if loss is not None else [None] * n_models
            accs = list(_as_float_array(acc)) if acc is not None else [None] * n_models
            per_model = [{**m, "test_loss": l, "test_accuracy": a}
                         for m, l, a in zip(models, losses, accs)]
        lines += ["", "### Per model", "", "| model | seed | lr | test loss | test accuracy |",
                  "|---|---|---|---|---|"]
        for i, m in enumerate(per_model):
            lines.append(f"| {i} | {m.get('seed', '–')} | {m.get('lr', '–')} | "
                         f"{_fmt(m.get('test_loss'))} | {_fmt(m.get('test_accuracy'), pct=True)} |")
    return lines


def _epoch_table(rows: list[dict[str, Any]], n_models: int) -> list[str]:
    """The per-epoch Markdown table (only the last epochs of long runs)."""
    columns = [k for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                           "test_loss", "test_accuracy", "epoch_seconds")
               if any(k in r for r in rows)]
    shown = rows[-TABLE_LAST_EPOCHS:]
    lines = ["## Per-epoch metrics", ""]
    if len(shown) < len(rows):
        lines += [f"Showing the last {len(shown)} of {len(rows)} epochs "
                  f"(all are in `{METRICS_FILE}`).", ""]
    if n_models > 1:
        lines += [f"Values are mean ± std over the {n_models} models.", ""]
    lines += ["| epoch | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for r in shown:
        cells = [(f"{_as_float_array(r[c]).mean():.1f}" if c == "epoch_seconds" and r.get(c) is not None
                  else _fmt(r.get(c), pct=c.endswith("accuracy"))) for c in columns]
        lines.append(f"| {r['epoch']} | " + " | ".join(cells) + " |")
    return lines


def write_report(run_dir: str | os.PathLike[str], *, test_images: Any, test_labels: Any,
                 probs: Any, class_names: Sequence[str] | None = None,
                 out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``learning_curves.png``, ``confusion_matrix.png``, ``errors.png`` and ``report.md``.

    Reads ``metrics.jsonl`` and (optionally) ``results.json`` from ``run_dir``;
    the config comes from results.json, else from ``config.json``. ``out_dir``
    defaults to ``run_dir/"report"``. ``probs`` are the test-set class
    probabilities (N, classes) of ONE model; for a several-model run pass model
    0's — a (models, N, classes) array is also accepted and its first model is
    used. The report states that the confusion matrix and the error grid come
    from model 0 (not an ensemble). Class names default to Fashion-MNIST's when
    the config's dataset mentions "fashion", else the digits. Returns report.md's path.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    rows = read_metrics(run_dir)
    results = _read_results(run_dir)
    config = results.get("config") if isinstance(results.get("config"), dict) else _read_config(run_dir)
    n_models = _num_models(rows, results)

    probs = np.asarray(probs, dtype=float)
    if probs.ndim == 3:
        probs = probs[0]
    labels = np.asarray(test_labels).astype(np.int64).ravel()
    images = _as_images(test_images)
    if probs.ndim != 2 or not (len(images) == labels.size == probs.shape[0]):
        raise DataError(f"{len(images)} test images, {labels.size} labels and probs of shape "
                        f"{probs.shape} do not match")
    num_classes = probs.shape[1]
    names = (_default_class_names(num_classes, str(config.get("dataset", "")))
             if class_names is None else _check_class_names(class_names, num_classes))

    out.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(rows, out / "learning_curves.png")
    cm = confusion_matrix(labels, probs.argmax(axis=1), num_classes)
    plot_confusion_matrix(cm, out / "confusion_matrix.png", names)
    errors = most_confident_errors(probs, labels, k=25)
    plot_error_grid(images, labels, probs, errors, out / "errors.png", names)

    model, dataset = config.get("model"), config.get("dataset")
    title = "# Training report" + (f": {model}" if model else "") + (f" on {dataset}" if dataset else "")
    which = "the model's"
    if n_models > 1:
        first = (rows[-1].get("models") or results.get("per_model") or [{}])[0]
        detail = ", ".join(f"{k} {first[k]}" for k in ("seed", "lr") if k in first)
        which = f"model 0's ({detail})" if detail else "model 0's"
    accuracy = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
    note = ([f"The confusion matrix and the error grid use {which} predictions only "
             "(not an ensemble of the models).", ""] if n_models > 1 else [])
    lines = [title, "", f"Run: `{run_dir.name}`", "", *note,
             *_summary_lines(rows, results, n_models), "",
             *_epoch_table(rows, n_models), "",
             "## Learning curves", "", "![Learning curves](learning_curves.png)", "",
             "## Confusion matrix", "",
             f"From {which} predictions on {labels.size} test examples "
             f"(accuracy {accuracy:.2%}); rows are true labels, columns predictions.", "",
             "![Confusion matrix](confusion_matrix.png)", "",
             "## Most confident errors", "",
             f"The {errors.size} misclassified test examples to which {which} predictions gave "
             "the highest probability, most confident first.", "",
             "![Most confident errors](errors.png)", "",
             "## Configuration", "", "```json",
             json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return _atomic_write(out / "report.md",
                         lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
