"""Specifications for mnist_jax.report: counts, ordering, errors, files, orientation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from mnist_jax.errors import DataError
from mnist_jax.report import (
    FASHION_MNIST_CLASSES,
    confusion_matrix,
    learning_curves_figure,
    most_confident_errors,
    plot_confusion_matrix,
    plot_error_grid,
    plot_learning_curves,
    read_metrics,
    write_report,
)

PNGS = ("learning_curves.png", "confusion_matrix.png", "errors.png")


# ---------------------------------------------------------------- helpers


def _write_run(run_dir: Path, *, models: int = 1, epochs: int = 5, results: bool = True,
               dataset: str = "mnist", curves: bool = False) -> dict:
    """A synthetic run directory; returns the results dict written (or would be)."""
    rng = np.random.default_rng(1)
    run_dir.mkdir(parents=True, exist_ok=True)

    def value(base: float):
        v = base + rng.normal(0, 0.005, models)
        return float(v[0]) if models == 1 else [float(x) for x in v]

    with open(run_dir / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            row = {"epoch": e, "train_loss": value(1 / e), "train_accuracy": value(0.9 - 0.1 / e),
                   "val_loss": value(1.1 / e), "val_accuracy": value(0.88 - 0.1 / e),
                   "epoch_seconds": 1.5}
            if curves:  # ten stretches of the epoch's steps, per model
                points = [[1 / (e - 1 + (i + 0.5) / 10) for i in range(10)] for _ in range(models)]
                row["train_loss_curve"] = points[0] if models == 1 else points
                row["train_accuracy_curve"] = row["train_loss_curve"]
            if models > 1:
                row["models"] = [{"seed": s, "lr": 0.001 * (s + 1)} for s in range(models)]
            f.write(json.dumps(row) + "\n")
    config = {"model": "cnn", "dataset": dataset, "epochs": epochs}
    if models == 1:
        res = {"config": config, "test_loss": 0.0421, "test_accuracy": 0.9876}
    else:
        accs = [0.9811, 0.9833, 0.9855][:models]
        res = {"config": config, "test_loss": [0.05] * models, "test_accuracy": accs,
               "test_accuracy_mean": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
               "test_accuracy_min": float(np.min(accs)), "ensemble_test_accuracy": 0.9872,
               "per_model": [{"seed": s, "lr": 0.001 * (s + 1), "test_loss": 0.05,
                              "test_accuracy": a} for s, a in enumerate(accs)]}
    if results:
        (run_dir / "results.json").write_text(json.dumps(res))
    return res


def _test_set(n: int = 60, classes: int = 10):
    """Random-blob 28×28 uint8 images, labels and random probabilities (some wrong)."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, (n, 2))
    images = (255 * np.exp(-((yy - centres[:, :1, None]) ** 2
                             + (xx - centres[:, 1:, None]) ** 2) / 12)).astype(np.uint8)
    labels = rng.integers(0, classes, n)
    probs = rng.dirichlet(np.ones(classes), n)
    return images, labels, probs


def _assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side, im.size
        im.load()  # fully decodable, not truncated


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=float)


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_counts_hand_made():
    cm = confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_rows_are_true_labels_and_total_is_count():
    cm = confusion_matrix(np.array([3, 3, 3]), np.array([5, 5, 3]))
    assert cm.shape == (10, 10)
    assert cm[3, 5] == 2 and cm[5, 3] == 0 and cm[3, 3] == 1
    assert cm.sum() == 3


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(DataError):
        confusion_matrix([0, 1], [0])
    with pytest.raises(DataError):
        confusion_matrix([0, 10], [0, 1], num_classes=10)


# ---------------------------------------------------------------- most confident errors


def test_most_confident_errors_order():
    probs = np.array([
        [0.9, 0.1, 0.0],  # label 0: correct
        [0.6, 0.3, 0.1],  # label 1: wrong, conf 0.6
        [0.05, 0.9, 0.05],  # label 2: wrong, conf 0.9
        [0.1, 0.2, 0.7],  # label 2: correct
        [0.0, 0.2, 0.8],  # label 0: wrong, conf 0.8
    ])
    labels = np.array([0, 1, 2, 2, 0])
    np.testing.assert_array_equal(most_confident_errors(probs, labels), [2, 4, 1])
    np.testing.assert_array_equal(most_confident_errors(probs, labels, k=2), [2, 4])


def test_most_confident_errors_none_wrong():
    probs = np.eye(3)
    assert most_confident_errors(probs, [0, 1, 2]).size == 0


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        read_metrics(tmp_path)


def test_read_metrics_bad_line_gives_line_number(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "train_loss": 0.5}\n{"epoch": 3, oops\n')
    with pytest.raises(DataError, match=r"line 3\b"):
        read_metrics(tmp_path)


def test_read_metrics_row_without_epoch(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2\b"):
        read_metrics(tmp_path)


def test_read_metrics_parses_scalar_and_list_rows(tmp_path):
    _write_run(tmp_path / "one")
    _write_run(tmp_path / "many", models=3)
    one, many = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "many")
    assert [r["epoch"] for r in one] == [1, 2, 3, 4, 5]
    assert isinstance(one[0]["train_loss"], float)
    assert len(many[0]["train_loss"]) == 3 and len(many[0]["models"]) == 3


# ---------------------------------------------------------------- write_report


@pytest.mark.parametrize("models", [1, 3])
def test_write_report_files_and_contents(tmp_path, models):
    run = tmp_path / "run"
    res = _write_run(run, models=models)
    images, labels, probs = _test_set()
    report = write_report(run, test_images=images, test_labels=labels, probs=probs)
    out = run / "report"
    assert report == out / "report.md"
    # exactly the four outputs, no temporary leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNGS, "report.md"])
    for name in PNGS:
        _assert_png(out / name)
    text = report.read_text()
    for name in PNGS:
        assert f"]({name})" in text  # relative link
    assert "cnn" in text.splitlines()[0] and "mnist" in text.splitlines()[0]
    assert "```" in text and '"dataset": "mnist"' in text
    if models == 1:
        assert "98.76%" in text
    else:
        mean, std = res["test_accuracy_mean"], res["test_accuracy_std"]
        assert f"{mean:.2%} ± {std:.2%}" in text
        for acc in res["test_accuracy"]:
            assert f"{acc:.2%}" in text  # per-model table
        assert "model 0" in text
    # per-epoch table: one row per epoch
    epochs = text.split("## Per-epoch metrics")[1].split("## ")[0]
    assert re.findall(r"^\| (\d+) \|", epochs, flags=re.M) == ["1", "2", "3", "4", "5"]


def _summary_table(text: str) -> dict[str, str]:
    """report.md's summary table as {metric: value} (the per-model table excluded)."""
    summary = text.split("## Summary")[1].split("###")[0].split("## ")[0]
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", summary, flags=re.M))


def test_summary_of_several_models_shows_mean_min_and_ensemble(tmp_path):
    res = _write_run(tmp_path, models=3)
    images, labels, probs = _test_set()
    table = _summary_table(write_report(tmp_path, test_images=images, test_labels=labels,
                                        probs=probs).read_text())
    mean, std = res["test_accuracy_mean"], res["test_accuracy_std"]
    assert table["test accuracy (mean ± std over 3 models)"] == f"{mean:.2%} ± {std:.2%}"
    assert table["test accuracy (min over 3 models)"] == f"{min(res['test_accuracy']):.2%}"
    assert table["ensemble test accuracy (mean of the 3 models' probabilities)"] == \
        f"{res['ensemble_test_accuracy']:.2%}"


def test_summary_without_recorded_ensemble_or_min(tmp_path):
    """A run from before ensembles were recorded: no ensemble row, the min from the
    per-model accuracies; a damaged ensemble value shows as "–", not a traceback."""
    res = _write_run(tmp_path, models=3)
    images, labels, probs = _test_set()
    for key in ("ensemble_test_accuracy", "test_accuracy_min"):
        del res[key]
    (tmp_path / "results.json").write_text(json.dumps(res))
    table = _summary_table(write_report(tmp_path, test_images=images, test_labels=labels,
                                        probs=probs).read_text())
    assert not any("ensemble" in k for k in table)
    assert table["test accuracy (min over 3 models)"] == f"{min(res['test_accuracy']):.2%}"

    (tmp_path / "results.json").write_text(json.dumps(dict(res, ensemble_test_accuracy="?")))
    table = _summary_table(write_report(tmp_path, test_images=images, test_labels=labels,
                                        probs=probs).read_text())
    assert table["ensemble test accuracy (mean of the 3 models' probabilities)"] == "–"


def test_summary_of_one_model_has_no_ensemble(tmp_path):
    _write_run(tmp_path, models=1)
    images, labels, probs = _test_set()
    table = _summary_table(write_report(tmp_path, test_images=images, test_labels=labels,
                                        probs=probs).read_text())
    assert table["test accuracy"] == "98.76%"
    assert not any("ensemble" in k or "min" in k for k in table)


def test_write_report_without_results_and_long_run(tmp_path):
    run = tmp_path / "run"
    _write_run(run, epochs=25, results=False)
    images, labels, probs = _test_set()
    out = tmp_path / "elsewhere"
    report = write_report(run, test_images=images, test_labels=labels, probs=probs, out_dir=out)
    assert report == out / "report.md"
    text = report.read_text()
    assert "last 10 of 25 epochs" in text
    epochs = text.split("## Per-epoch metrics")[1].split("## ")[0]
    rows = re.findall(r"^\| (\d+) \|", epochs, flags=re.M)
    assert rows == [str(e) for e in range(16, 26)]
    for name in PNGS:
        _assert_png(out / name)


def test_write_report_rejects_mismatched_inputs(tmp_path):
    _write_run(tmp_path)
    images, labels, probs = _test_set()
    with pytest.raises(DataError):
        write_report(tmp_path, test_images=images, test_labels=labels[:-1], probs=probs)


def test_write_report_fashion_names_by_default(tmp_path):
    _write_run(tmp_path, dataset="fashion_mnist")
    images, labels, probs = _test_set()
    write_report(tmp_path, test_images=images, test_labels=labels, probs=probs)
    _assert_png(tmp_path / "report" / "confusion_matrix.png")
    assert len(FASHION_MNIST_CLASSES) == 10


# ---------------------------------------------------------------- figures


def test_learning_curves_png(tmp_path):
    _write_run(tmp_path, models=3)
    path = plot_learning_curves(read_metrics(tmp_path), tmp_path / "lc.png")
    _assert_png(path)


@pytest.mark.parametrize("models", [1, 3])
def test_training_is_drawn_within_each_epoch_and_evaluation_after_it(tmp_path, models):
    _write_run(tmp_path, models=models, epochs=2, curves=True)
    for ax in learning_curves_figure(read_metrics(tmp_path)).axes:
        train, val = ax.lines[:2]
        np.testing.assert_allclose(train.get_xdata(), np.arange(20) / 10 + 0.05)
        assert list(val.get_xdata()) == [1, 2]
        assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == (
            ["train", "val"] if models == 1 else ["train (mean)", "val (mean)"])


def test_a_test_set_read_only_after_the_last_epoch_is_one_point_there(tmp_path):
    _write_run(tmp_path, epochs=40)  # validation every epoch, as with --validation-split
    rows = read_metrics(tmp_path)
    rows[-1].update(test_loss=0.04, test_accuracy=0.99)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for ax in learning_curves_figure(read_metrics(tmp_path)).axes:
        val, test = ax.lines[1:3]
        assert len(val.get_xdata()) == 40 and list(test.get_xdata()) == [40]
        assert test.get_marker() == "o"  # a point without its marker would not show
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val", "test"]


def test_a_run_without_within_epoch_curves_draws_training_at_each_epoch(tmp_path):
    _write_run(tmp_path, epochs=2)
    train = learning_curves_figure(read_metrics(tmp_path)).axes[0].lines[0]
    assert list(train.get_xdata()) == [1, 2]


def test_within_epoch_points_are_not_counted_as_models(tmp_path):
    _write_run(tmp_path, models=1, epochs=1, curves=True)
    images, labels, probs = _test_set()
    text = write_report(tmp_path, test_images=images, test_labels=labels, probs=probs).read_text()
    assert _summary_table(text)["test accuracy"] == "98.76%"
    assert "models" not in text.split("## Learning curves")[0]


def test_plot_confusion_matrix_png(tmp_path):
    cm = confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], num_classes=3)
    path = plot_confusion_matrix(cm, tmp_path / "cm.png", class_names=["a", "b", "c"])
    _assert_png(path)
    with pytest.raises(DataError):
        plot_confusion_matrix(cm, tmp_path / "bad.png", class_names=["a", "b"])


def test_images_written_atomically(tmp_path, monkeypatch):
    """A save that dies half way leaves neither the target nor a temp file behind."""
    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    cm = np.eye(3, dtype=int)
    with pytest.raises(KeyboardInterrupt):
        plot_confusion_matrix(cm, tmp_path / "cm.png", class_names=["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def _render_single(tmp_path: Path, name: str, image: np.ndarray) -> np.ndarray:
    probs = np.array([[0.01] * 2 + [0.91] + [0.01] * 7])  # true 7, predicted 2
    path = plot_error_grid(image[None], [7], probs, [0], tmp_path / name)
    return _gray(path)


def test_error_grid_shows_digit_upright(tmp_path):
    blank = np.zeros((28, 28), np.uint8)
    full = np.full((28, 28), 255, np.uint8)
    top_bar = blank.copy()
    top_bar[:5, :] = 255  # ink only in the top rows
    g_blank = _render_single(tmp_path, "blank.png", blank)
    g_full = _render_single(tmp_path, "full.png", full)
    g_top = _render_single(tmp_path, "top.png", top_bar)
    # the image cell: pixels that change between an empty and a fully inked digit
    cell = np.abs(g_full - g_blank) > 100
    ys, xs = np.nonzero(cell)
    assert ys.size > 28 * 28  # drawn at least one screen pixel per image pixel
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height = bottom - top + 1
    # ink of the top-bar digit: darker than the blank rendering, inside the cell
    ink = (g_blank - g_top) > 100
    iy, ix = np.nonzero(ink)
    assert iy.size > 0
    assert iy.min() >= top and iy.max() <= bottom
    assert iy.max() < top + 0.3 * height  # only in the upper part of the cell
    assert not ink[top + height // 2: bottom + 1].any()  # nothing in the lower half
    assert ix.min() <= left + 2 and ix.max() >= right - 2  # spans the width: not transposed
    # ink is dark on a light background (gray_r) or at least differs clearly
    assert g_top[iy, ix].mean() < 100


def test_error_grid_title_and_layout(tmp_path):
    images, labels, probs = _test_set(n=40)
    idx = most_confident_errors(probs, labels, k=25)
    assert idx.size == 25
    path = plot_error_grid(images, labels, probs, idx, tmp_path / "grid.png")
    _assert_png(path, min_side=500)
    with Image.open(path) as im:
        w, h = im.size
    assert 0.7 < w / h < 1.4  # 5×5, roughly square
