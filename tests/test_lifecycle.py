"""A whole run as library calls: ``mj.train_run`` writes what ``mnist-jax train`` writes,
for a user's module too, and ``mj.load_run`` reads it back.

Small synthetic digits keep these fast; the real-data runs are in test_usermodel.py,
test_resume.py and test_training_failures.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import mnist_jax as mj
from mnist_jax.errors import UsageError
from mnist_jax.lifecycle import check_resume_config
from mnist_jax.run import MEMORY_LIMIT_ENV
from mnist_jax.usermodel import build_user_model

NET = Path(__file__).resolve().parent / "assets" / "net.py"


def small_net():
    return build_user_model(f"{NET}:Net", '{"features": [4], "hidden": 16}')


def test_train_run_writes_a_run_that_load_run_reads_back_for_a_user_model(digits, tmp_path):
    config = mj.TrainConfig(epochs=2, batch_size=64, seeds=(0, 1), checkpoint_every=1)
    lines: list[str] = []
    outcome = mj.train_run(config, tmp_path / "run", model=small_net(),
                           optimizer=optax.adam(3e-3), dataset=digits, progress=False,
                           log=lines.append)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "results.json",
                                                 "params.msgpack", "checkpoints", "tb"}
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and len(results["per_model"]) == 2
    assert results["config"]["model"] == f"{NET}:Net"  # where the module came from
    assert results["config"]["optimizer"] == "custom"  # not the config's Adam, never used
    assert json.loads(results["config"]["model_args"]) == {"features": [4], "hidden": 16,
                                                           "num_classes": 10}
    assert 0.0 <= results["ensemble_test_accuracy"] <= 1.0
    assert any("Net" in line for line in lines)  # the summary went to the log

    loaded = mj.load_run(run)  # the model rebuilt from config.json alone
    assert set(loaded.state.model_state) == {"batch_stats"}
    for i in range(2):
        scores = mj.evaluate(loaded.model_state(i), digits.test_images, digits.test_labels)
        assert scores["accuracy"] == pytest.approx(results["test_accuracy"][i], abs=1e-6)
    np.testing.assert_array_equal(
        mj.predict_classes(loaded.model_state(0), digits.test_images[:30]), outcome.first_classes)


def test_train_run_refuses_a_user_model_that_does_not_fit_before_writing(digits, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")
    with pytest.raises(UsageError, match="does not fit"):
        mj.train_run(mj.TrainConfig(epochs=1, batch_size=64), tmp_path / "run",
                     model=small_net(), optimizer=optax.sgd(0.1), dataset=digits,
                     progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_of_the_users_halts_training(digits):
    def exploding(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels) * np.inf
    with pytest.raises(mj.TrainingDiverged, match="epoch 1, step 0"):
        mj.fit(mj.TrainConfig(epochs=1, batch_size=64), digits, model=small_net(),
               optimizer=optax.sgd(0.1), loss=exploding)


def test_resume_may_extend_a_constant_run_but_not_a_scheduled_one():
    """A schedule spans the run's --epochs: more epochs would change every step's rate."""
    check_resume_config(mj.TrainConfig(epochs=5), mj.TrainConfig(epochs=10))
    for schedule in ("cosine", "onecycle"):
        planned = mj.TrainConfig(epochs=5, lr_schedule=schedule)
        check_resume_config(planned, planned)
        with pytest.raises(UsageError, match="epochs"):
            check_resume_config(planned, mj.TrainConfig(epochs=10, lr_schedule=schedule))
    with pytest.raises(UsageError, match="augment"):
        check_resume_config(mj.TrainConfig(), mj.TrainConfig(augment="translate=2"))


def test_resume_compares_model_args_as_json_objects_not_as_text():
    saved = mj.TrainConfig(model="cnn", model_args='{"conv_dropout":0.1,"dense_dropout":0.2}')
    check_resume_config(saved, dataclasses.replace(
        saved, model_args='{"dense_dropout": 0.2, "conv_dropout": 0.1}'))
    with pytest.raises(UsageError, match="model_args"):
        check_resume_config(saved, dataclasses.replace(saved, model_args='{"conv_dropout": 0.1}'))


def test_a_custom_optimizer_run_continues_only_with_the_optimizer_given_again(digits, tmp_path):
    config = mj.TrainConfig(epochs=1, batch_size=64)
    quiet = dict(dataset=digits, progress=False, log=lambda s: None)
    mj.train_run(config, tmp_path / "run", model=small_net(), optimizer=optax.sgd(0.1), **quiet)
    with pytest.raises(UsageError, match="optimizer"):  # the config's Adam is not what ran
        mj.train_run(mj.TrainConfig(epochs=2, batch_size=64), tmp_path / "run", resume=True,
                     model=small_net(), **quiet)
    again = mj.train_run(mj.TrainConfig(epochs=2, batch_size=64), tmp_path / "run", resume=True,
                         model=small_net(), optimizer=optax.sgd(0.1), **quiet)
    assert len(again.result.history) == 2


def test_tensorboard_logging_does_not_import_torch_yet_leaves_it_importable(tmp_path):
    # tensorboardX imports torch whenever it is installed (1.5 s of a speedrun process); a
    # stand-in torch on the path records whether anything imported it.
    (tmp_path / "torch.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n")
    script = (
        "import sys; from pathlib import Path\n"
        "from mnist_jax.config import TrainConfig\n"
        "from mnist_jax.lifecycle import _Tensorboard\n"
        f"tb = _Tensorboard(Path({str(tmp_path / 'tb')!r}), TrainConfig())\n"
        "tb.log({'epoch': 1, 'loss': 0.5}); tb.close()\n"
        f"assert not Path({str(tmp_path / 'imported')!r}).exists(), 'torch was imported'\n"
        "import torch\n"
        f"assert Path({str(tmp_path / 'imported')!r}).exists()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_overwrite_replaces_what_the_old_run_made_from_its_model(digits, tmp_path):
    """A report and exported files belong to the run that made them: --overwrite removes
    them with the rest, so nothing in the folder describes a model it no longer holds."""
    config = mj.TrainConfig(epochs=1, batch_size=64, hidden=(16,), checkpoint_every=0)
    quiet = dict(dataset=digits, progress=False, log=lambda _: None)
    mj.train_run(config, tmp_path / "run", **quiet)
    for made in ("report", "export"):
        (tmp_path / "run" / made).mkdir()
        (tmp_path / "run" / made / "old").write_text("the old model's")
    mj.train_run(config, tmp_path / "run", overwrite=True, **quiet)
    assert not (tmp_path / "run" / "report").exists()
    assert not (tmp_path / "run" / "export").exists()
