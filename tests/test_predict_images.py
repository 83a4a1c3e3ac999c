"""Predicting real digits from image files: ``mnist-jax predict RUN IMAGE_OR_FOLDER…`` and
``mnist_jax.predict_images``.

A real MLP is trained once (2 epochs of the tutorial recipe through the CLI). 300 MNIST test
digits are then rendered as photos of ink on paper (``images.render_like_photo``: dark ink
on light, tinted, noisy paper, 60–300 px canvases, the digit at 45–85 % of the side and
off-centre, sometimes blurred, RGB) and saved as PNG and JPEG. Their predictions must agree
with the labels about as well as the raw 28×28 test images do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mnist_jax as mj
from mnist_jax import cli
from mnist_jax.images import render_like_photo

N_PHOTOS = 300
pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    run = tmp_path_factory.mktemp("photo_run") / "mlp"
    assert cli.main(["train", "--data-dir", str(mnist_dir), "--out", str(run), "--epochs", "2",
                     "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory, mnist_dir, trained):
    """300 test digits as photo-like PNG/JPEG files; returns (folder, files, labels, raw)."""
    mnist = mj.load_dataset("mnist", mnist_dir)  # the default cache, as the CLI run used
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(2024)
    idx = rng.choice(len(mnist.test_labels), N_PHOTOS, replace=False)
    files = []
    for k, i in enumerate(idx):
        img = render_like_photo(mnist.test_images[i], rng)
        path = folder / f"{k:03d}.{'png' if k % 2 else 'jpg'}"
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        files.append(path)
    return folder, files, mnist.test_labels[idx], mnist.test_images[idx]


def _state(run):
    return mj.load_run(run).model_state(0)


def test_photos_of_real_digits_are_recognised_about_as_well_as_the_raw_images(trained, photos):
    folder, files, labels, raw = photos
    state = _state(trained)
    raw_acc = float((mj.predict_classes(state, raw) == labels).mean())

    results = mj.predict_images(state, [folder], batch_size=128)
    assert [r["file"] for r in results] == [str(f) for f in files]  # sorted, none skipped
    assert all("error" not in r for r in results)
    predicted = np.array([r["class"] for r in results])
    photo_acc = float((predicted == labels).mean())
    print(f"\n{N_PHOTOS} real test digits: raw 28x28 accuracy {raw_acc:.3f}, "
          f"rendered as photos (PNG/JPEG, off-centre, 60-300 px, RGB) {photo_acc:.3f}")
    assert raw_acc >= 0.93
    assert photo_acc >= raw_acc - 0.05
    probs = np.array([r["probabilities"] for r in results])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_cli_prints_class_and_top3_per_file(trained, photos, capsys):
    folder, files, labels, _ = photos
    assert cli.main(["predict", str(trained), str(files[0]), str(files[1]), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, f in zip(lines, files):
        assert line.startswith(f"{f}: ")
        cls, top = line.split(": ", 1)[1].split("  ", 1)
        assert top.startswith(f"({cls}: ") and top.count(":") == 3  # three "class: prob"


def test_cli_json_is_one_object_per_file_matching_the_api(trained, photos, capsys):
    folder, files, labels, _ = photos
    assert cli.main(["predict", str(trained), str(folder), "--json", "--batch-size", "64"]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == N_PHOTOS and err == ""  # --json: no progress bar either
    api = mj.predict_images(_state(trained), [str(f) for f in files[:10]])
    for rec, ref in zip(records, api):
        assert rec["file"] == ref["file"] and rec["class"] == ref["class"]
        assert len(rec["top3"]) == 3 and rec["top3"][0]["class"] == rec["class"]
        ps = [t["probability"] for t in rec["top3"]]
        assert ps == sorted(ps, reverse=True)
        assert ps[0] == pytest.approx(max(ref["probabilities"]), rel=1e-5)
