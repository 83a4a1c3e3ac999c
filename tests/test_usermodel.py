"""A user's own Flax module trains with the whole machinery (issue: bring your own model).

The acceptance runs train the conv + BatchNorm net of ``tests/assets/net.py`` for one
epoch of real MNIST through the API with two seeds and ``optax.adamw`` in one program;
``optax.sgd`` trains it on a quarter of MNIST, scored by ``mj.evaluate``, and the CLI
trains it as ``net.py:Net`` for one epoch of MNIST's first 8,192 digits.
Naming a module wrongly is a one-line usage error (exit 2).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import mnist_jax as mj
from mnist_jax import cli
from mnist_jax.errors import UsageError
from mnist_jax.usermodel import build_user_model, describe, load_model_class, normalize_spec

from _model_helpers import (assert_each_seed_scores, assert_statistics_trained_per_model,
                            sgd_on_a_quarter)

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "tests" / "assets" / "net.py"


@pytest.fixture(scope="module")
def adamw_two_seeds(mnist):
    """The issue's snippet: a conv + BatchNorm net, two seeds, adamw, one epoch."""
    net = build_user_model(f"{NET}:Net")
    return mj.fit(mj.TrainConfig(epochs=1, batch_size=128, seeds=(0, 1)), mnist,
                  model=net, optimizer=optax.adamw(2e-3))


@pytest.mark.realdata
def test_each_seed_of_a_batchnorm_net_reaches_97_percent_after_one_epoch(adamw_two_seeds, mnist):
    assert_each_seed_scores(adamw_two_seeds, mnist, 0.97,
                            "conv+BN net, adamw(2e-3), 1 epoch, seeds 0 and 1")


@pytest.mark.realdata
def test_batchnorm_statistics_are_trained_kept_per_model_and_used_in_evaluation(
        adamw_two_seeds, mnist):
    stats = adamw_two_seeds.state.model_state["batch_stats"]["BatchNorm_0"]
    assert_statistics_trained_per_model(adamw_two_seeds, stats, mnist, features=8)


@pytest.mark.realdata
def test_an_sgd_trained_user_model_is_scored_by_evaluate(mnist):
    sgd_on_a_quarter(mnist, build_user_model(f"{NET}:Net"), 0.95, "conv+BN net")  # 0.967


@pytest.mark.realdata
def test_the_cli_trains_and_evaluates_net_py_from_its_folder(mnist_part, tmp_path, monkeypatch,
                                                             capsys):
    shutil.copy(NET, tmp_path / "net.py")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "net.py:Net", "--epochs", "1", "--data-dir",
                     str(mnist_part), "--out", "run", "--quiet"]) == 0
    trained = capsys.readouterr().out
    assert cli.main(["evaluate", "run", "--data-dir", str(mnist_part)]) == 0
    evaluated = capsys.readouterr().out.strip().splitlines()[-1]
    saved = mj.load_run(tmp_path / "run").config
    assert saved.model == f"{tmp_path / 'net.py'}:Net"  # where it came from, absolute
    acc = float(evaluated.rsplit("test accuracy ", 1)[1])
    print(f"net.py:Net through the CLI, 64 steps: test accuracy {acc}")
    assert acc >= 0.8 and f"test accuracy {acc:.4f}" in trained  # 0.87 measured


def test_a_stacked_state_must_be_unstacked_for_the_one_model_api():
    net = build_user_model(f"{NET}:Net", '{"features": [2]}')
    cfg = mj.TrainConfig(seeds=(0, 1))
    state = mj.init_state(cfg, model=net, optimizer=optax.sgd(0.1))
    images = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(UsageError, match="unstack_state"):
        mj.evaluate(state, images, np.zeros(4, np.int32))
    assert mj.predict(mj.unstack_state(state, 1), images).shape == (4, 10)


def test_a_learning_rate_sweep_needs_an_optimizer_that_exposes_its_rate():
    net = build_user_model(f"{NET}:Net", '{"features": [2]}')
    cfg = mj.TrainConfig(learning_rates=(0.1, 0.01))
    with pytest.raises(UsageError, match="inject_hyperparams"):
        mj.init_state(cfg, model=net, optimizer=optax.sgd(0.1))
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    state = mj.init_state(cfg, model=net, optimizer=tx)
    np.testing.assert_allclose(state.opt_state.hyperparams["learning_rate"], [0.1, 0.01])


def test_a_module_is_rebuilt_from_what_describe_records():
    net = build_user_model(f"{NET}:Net", '{"features": [3, 5]}')
    spec, args = describe(net)
    again = build_user_model(spec, args)
    assert type(again).__name__ == "Net" and tuple(again.features) == (3, 5)
    assert normalize_spec("net.py:Net") == f"{Path.cwd() / 'net.py'}:Net"
    assert normalize_spec("pkg.mod:Net") == "pkg.mod:Net"
    assert load_model_class("flax.linen:Dense").__name__ == "Dense"


@pytest.mark.parametrize("spec, words", [
    ("missing.py:Net", "no such file"),
    ("broken.py:Net", "importing it failed"),
    ("net.py:Nope", "has no Nope"),
    ("net.py:helper", "neither a flax.linen Module nor an NNX Module"),
    ("no_such_package_xyz.mod:Net", "cannot import"),
    ("net.py:", "expected path/to/file.py:ClassName"),
])
def test_a_bad_model_spec_exits_2_with_one_line(spec, words, tmp_path, monkeypatch):
    shutil.copy(NET, tmp_path / "net.py")
    with open(tmp_path / "net.py", "a") as f:
        f.write("\n\ndef helper():\n    return 1\n")
    (tmp_path / "broken.py").write_text("import flax.linen as nn\nraise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mnist_jax.cli", "train", "--model", spec,
                           "--epochs", "1", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ,
                               "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_model_args_are_a_usage_error():
    with pytest.raises(UsageError, match="--model-args"):
        build_user_model(f"{NET}:Net", '{"no_such_field": 1}')
    with pytest.raises(UsageError, match="--model-args.*Net.hidden must be int, got 'wide'"):
        build_user_model(f"{NET}:Net", '{"hidden": "wide"}')  # not a traceback at trace time
    with pytest.raises(UsageError, match="--model-args"):
        mj.TrainConfig(model=f"{NET}:Net", model_args="[1, 2]").validate()


def test_model_args_set_a_presets_fields_too():
    from mnist_jax.run import build_model
    model = build_model(mj.TrainConfig(model="smallcnn", model_args='{"weight_init": "lecun"}'))
    assert model.weight_init == "lecun" and model.features == (24, 32)
    model = build_model(mj.TrainConfig(model="cnn", model_args='{"features": [8, 16]}'))
    assert model.features == (8, 16)  # JSON lists become the tuples a module field holds
    for args in ('{"colour": 1}', '{"weight_init": "glorot"}'):
        with pytest.raises(UsageError, match="--model-args"):
            build_model(mj.TrainConfig(model="smallcnn", model_args=args))
