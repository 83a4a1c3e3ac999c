"""Flax NNX models get the whole machinery, as linen modules do.

The net is ``tests/assets/nnx_net.py``: Conv, BatchNorm, Dropout and Linear written as
Flax's NNX documentation writes modules. Through the API it is passed as its class (one
model per seed, initialised inside the compiled program) or as an instance (one model,
trained from its own weights); through the CLI as ``--model nnx_net.py:Net``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mnist_jax as mj
from mnist_jax import cli
from mnist_jax.errors import UsageError
from mnist_jax.nnxmodel import NNX_STATE, NNXModel
from mnist_jax.usermodel import as_model, describe, load_model_class

from _model_helpers import (assert_each_seed_scores, assert_statistics_trained_per_model,
                            sgd_on_a_quarter)

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "tests" / "assets" / "nnx_net.py"
Net = load_model_class(f"{NET}:Net")
SMALL = functools.partial(Net, features=(4,), hidden=16)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def adamw_two_seeds(mnist):
    """Two seeds of the class in one program, adamw(2e-3), one epoch of real MNIST."""
    return mj.fit(mj.TrainConfig(epochs=1, batch_size=128, seeds=(0, 1)), mnist,
                  model=Net, optimizer=optax.adamw(2e-3))


@pytest.mark.realdata
def test_each_seed_of_the_nnx_net_reaches_97_percent_after_one_epoch(adamw_two_seeds, mnist):
    assert_each_seed_scores(adamw_two_seeds, mnist, 0.97,
                            "NNX conv+BN+dropout net, adamw(2e-3), 1 epoch, seeds 0 and 1")


@pytest.mark.realdata
def test_batchnorm_statistics_live_in_model_state_per_model_and_serve_evaluation(
        adamw_two_seeds, mnist):
    stats = adamw_two_seeds.state.model_state[NNX_STATE]["norms"]["0"]
    assert_statistics_trained_per_model(adamw_two_seeds, stats, mnist, features=8)


@pytest.mark.realdata
def test_an_instance_trained_with_sgd_is_scored_by_evaluate(mnist):
    sgd_on_a_quarter(mnist, Net(rngs=nnx.Rngs(0)), 0.95, "NNX instance")


def test_an_instance_starts_from_its_own_weights():
    net = SMALL(rngs=nnx.Rngs(7))
    state = mj.init_state(mj.TrainConfig(seeds=(3,)), model=net, optimizer=optax.sgd(0.1))
    own = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    assert np.array_equal(state.params["dense"]["kernel"], own["dense"]["kernel"])
    assert np.array_equal(state.params["convs"]["0"]["kernel"], own["convs"][0]["kernel"])


def test_an_instance_with_several_seeds_or_rates_is_refused_in_one_line():
    net = SMALL(rngs=nnx.Rngs(0))
    for cfg in (mj.TrainConfig(seeds=(0, 1)), mj.TrainConfig(learning_rates=(1e-3, 1e-2))):
        with pytest.raises(UsageError, match=r"pass the class \(model=Net\)") as e:
            mj.init_state(cfg, model=net)
        assert "\n" not in str(e.value)


def test_the_same_seed_repeats_bitwise_and_a_sweep_member_equals_its_seed_alone(digits):
    cfg = mj.TrainConfig(epochs=2, batch_size=64)
    sweep = mj.fit(dataclasses.replace(cfg, seeds=(0, 1)), digits, model=SMALL)
    alone = mj.fit(dataclasses.replace(cfg, seeds=(1,)), digits, model=SMALL)
    again = mj.fit(dataclasses.replace(cfg, seeds=(1,)), digits, model=SMALL)
    assert leaves_equal(alone.state.params, again.state.params)
    assert leaves_equal(alone.state.model_state, again.state.model_state)
    member = mj.unstack_state(sweep.state, 1)
    assert leaves_equal(member.params, alone.state.params)
    assert leaves_equal(member.model_state, alone.state.model_state)
    assert not leaves_equal(mj.unstack_state(sweep.state, 0).params, member.params)


def test_dropout_keys_come_from_the_state_not_from_the_modules_own_rngs(digits):
    """Two instances with different nnx.Rngs but the same weights train identically: the
    module's streams are re-keyed from the state's rng and step on every call."""
    net = SMALL(rngs=nnx.Rngs(0))
    twin = SMALL(rngs=nnx.Rngs(0))
    nnx.update(twin, nnx.state(net, nnx.Param))
    for stream in nnx.to_pure_dict(nnx.state(twin, nnx.RngKey)).values():
        assert stream  # the twin does carry its own streams...
    nnx.reseed(twin, default=99)  # ...reseeded: they must not matter
    cfg = mj.TrainConfig(epochs=1, batch_size=64)
    a = mj.fit(cfg, digits, model=net, optimizer=optax.adam(1e-3))
    b = mj.fit(cfg, digits, model=twin, optimizer=optax.adam(1e-3))
    assert leaves_equal(a.state.params, b.state.params)
    c = mj.fit(dataclasses.replace(cfg, seeds=(5,)), digits, model=net,
               optimizer=optax.adam(1e-3))
    assert not leaves_equal(a.state.params, c.state.params)  # the seed does


def test_a_learning_rate_sweep_trains_one_model_per_rate(digits):
    cfg = mj.TrainConfig(epochs=1, batch_size=64, learning_rates=(1e-3, 1e-2))
    result = mj.fit(cfg, digits, model=SMALL)
    np.testing.assert_allclose(result.state.opt_state.hyperparams["learning_rate"], [1e-3, 1e-2])
    assert not leaves_equal(mj.unstack_state(result.state, 0).params,
                            mj.unstack_state(result.state, 1).params)
    assert len(result.test["accuracy"]) == 2


def test_the_best_recipes_augmentation_and_schedule_train_an_nnx_model(digits):
    best = mj.TrainConfig.from_recipe("best", epochs=1, batch_size=64)
    assert best.augment != "none" and best.lr_schedule == "onecycle"
    plain = dataclasses.replace(best, augment="none")
    augmented = mj.fit(best, digits, model=SMALL)
    unaugmented = mj.fit(plain, digits, model=SMALL)
    assert np.isfinite(augmented.history[-1]["train_loss"])
    assert not leaves_equal(augmented.state.params, unaugmented.state.params)
    assert augmented.test["accuracy"] > 0.2  # learns (chance: 0.1)


def test_a_bridged_linen_model_with_dropout_trains_as_its_nnx_class_and_is_recorded(
        digits, tmp_path):
    bridged = nnx.bridge.to_linen(Net, features=(4,), hidden=16)
    adapted = as_model(bridged)
    assert isinstance(adapted, NNXModel)
    outcome = mj.train_run(mj.TrainConfig(epochs=1, batch_size=64), tmp_path / "run",
                           model=bridged, dataset=digits, progress=False, log=lambda _: None)
    config = json.loads((outcome.run_dir / "config.json").read_text())
    assert config["model"] == f"{NET}:Net"
    assert json.loads(config["model_args"]) == {"features": [4], "hidden": 16}
    loaded = mj.load_run(outcome.run_dir)  # rebuilt from config.json alone
    np.testing.assert_allclose(mj.predict(loaded.state, digits.test_images[:20]),
                               mj.predict(outcome.result.state, digits.test_images[:20]),
                               atol=1e-6)


def test_describe_records_the_class_and_keyword_arguments():
    assert describe(as_model(SMALL)) == (f"{NET}:Net", '{"features": [4], "hidden": 16}')
    assert describe(as_model(Net)) == (f"{NET}:Net", None)
    assert describe(as_model(Net(rngs=nnx.Rngs(0)))) == (f"{NET}:Net", None)


def test_the_trained_module_comes_back_as_an_nnx_module(digits):
    result = mj.fit(mj.TrainConfig(epochs=1, batch_size=64), digits, model=SMALL)
    module = result.state.apply_fn.__self__.module(result.state.variables)
    module.eval()
    x = digits.test_images[:16].astype(np.float32) / 255.0
    np.testing.assert_allclose(jax.nn.softmax(module(x)), mj.predict(result.state,
                                                                     digits.test_images[:16]),
                               atol=1e-6)


def test_summary_lists_the_layers_and_counts_batchnorm_statistics_as_non_trainable():
    text = mj.summary(SMALL)
    assert 'Model: "Net"' in text and "BatchNorm" in text and "Linear" in text
    # conv 3*3*1*4 = 36; BatchNorm scale+bias 8 (+ mean/var 8 non-trainable);
    # dense 13*13*4*16 + 16 = 10,832; out 16*10 + 10 = 170
    assert "Trainable params: 11,046" in text and "Non-trainable params: 8" in text


@pytest.mark.realdata
def test_the_cli_trains_then_evaluates_predicts_and_reports_from_another_folder(
        mnist_part, mnist, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(NET, work / "nnx_net.py")
    monkeypatch.chdir(work)
    assert cli.main(["train", "--model", "nnx_net.py:Net", "--model-args",
                     '{"features": [8, 16], "dropout": 0.2}', "--epochs", "1", "--data-dir",
                     str(mnist_part), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    trained = capsys.readouterr().out
    assert "BatchNorm" in trained  # the summary of the model it trains
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == f"{work / 'nnx_net.py'}:Net"
    assert json.loads(saved["model_args"]) == {"features": [8, 16], "dropout": 0.2}

    monkeypatch.chdir(elsewhere)
    run = str(tmp_path / "run")
    assert cli.main(["evaluate", run, "--data-dir", str(mnist_part)]) == 0
    acc = float(capsys.readouterr().out.strip().splitlines()[-1].rsplit("test accuracy ", 1)[1])
    print(f"nnx_net.py:Net through the CLI, 64 steps: test accuracy {acc}")
    assert acc >= 0.8 and f"test accuracy {acc:.4f}" in trained

    from PIL import Image
    digit = int(mnist.test_labels[0])
    Image.fromarray(mnist.test_images[0]).save(elsewhere / "digit.png")
    assert cli.main(["predict", run, "digit.png", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class"] == digit
    assert cli.main(["report", run, "--data-dir", str(mnist_part)]) == 0
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert cli.main(["summary", "--model", f"{work / 'nnx_net.py'}:Net"]) == 0
    assert "Non-trainable params: 48" in capsys.readouterr().out  # BatchNorm mean/var 8 + 16
