"""TrainConfig: tutorial defaults, validation, and one flag per field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from mnist_jax.config import RECIPES, TrainConfig, add_config_flags, config_from_args
from mnist_jax.errors import UsageError


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults_are_the_tutorial_recipe():
    c = TrainConfig()
    assert (c.model, c.dataset, c.epochs, c.batch_size) == ("mlp", "mnist", 100, 128)
    assert c.learning_rates == (1e-3,) and c.adam_eps == 1e-7 and c.seeds == (0,)
    assert parse() == c


def test_every_field_is_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests


def test_lists_of_seeds_and_learning_rates():
    c = parse("--seeds", "0,1,2", "--lr", "1e-3,3e-4")
    assert c.seeds == (0, 1, 2) and c.learning_rates == (1e-3, 3e-4)
    assert c.num_models == 6
    assert c.model_grid()[:2] == [{"seed": 0, "lr": 1e-3}, {"seed": 0, "lr": 3e-4}]
    assert parse("--seed", "7").seeds == (7,)


@pytest.mark.parametrize("field,value,flag", [
    ("epochs", 0, "--epochs"), ("epochs", -3, "--epochs"), ("batch_size", 0, "--batch-size"),
    ("learning_rates", (float("nan"),), "--lr"), ("learning_rates", (-1.0,), "--lr"),
    ("model", "resnet", "--model"), ("validation_split", 1.0, "--validation-split"),
    ("seeds", (1, 1), "--seeds"), ("seeds", (2**31,), "--seeds"), ("devices", 0, "--devices"),
    ("learning_rates", (1e-3, 1e-3), "--lr"),
    ("lr_schedule", "step", "--lr-schedule"), ("optimizer", "rmsprop", "--optimizer"),
    ("betas", (0.9,), "--betas"), ("warmup", 1.0, "--warmup"),
    ("label_smoothing", -0.1, "--label-smoothing"), ("augment", "rotation=x", "--augment"),
    ("augment", "spin=3", "--augment"), ("model_args", "[1]", "--model-args"),
    ("recipe", "fastest", "--recipe"),
])
def test_invalid_values_are_usage_errors_naming_the_flag(field, value, flag):
    with pytest.raises(UsageError, match=flag):
        dataclasses.replace(TrainConfig(), **{field: value}).validate()


def test_learning_rate_schedule_and_the_run_length_it_spans():
    assert parse().lr_schedule == "constant"  # Keras' default: no decay
    c = parse("--lr-schedule", "cosine", "--epochs", "12", "--validation-split", "0.1")
    assert c.lr_schedule == "cosine"
    assert c.total_steps(60000) == 12 * (54000 // 128)


def test_a_config_survives_its_config_json():
    """What a run folder saves rebuilds the same config: tuples come back from JSON lists,
    keys this version does not know are ignored, and the values are validated."""
    c = TrainConfig(model="cnn", seeds=(1, 2), learning_rates=(1e-3, 1e-4), hidden=(32,),
                    dropout=0.2, devices=2, lr_schedule="cosine")
    saved = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(saved) == c
    assert TrainConfig.from_dict({**saved, "a_later_field": 1}) == c
    with pytest.raises(UsageError, match="--epochs"):
        TrainConfig.from_dict({**saved, "epochs": 0})


def test_a_recipe_sets_every_value_and_the_flags_given_override_it():
    speedrun = parse("--recipe", "speedrun")
    assert speedrun == TrainConfig.from_recipe("speedrun")
    assert (speedrun.model, speedrun.epochs, speedrun.batch_size) == ("smallcnn", 1, 256)
    assert speedrun.learning_rates == (1e-2,) and speedrun.betas == (0.7, 0.9)
    assert speedrun.lr_schedule == "onecycle" and speedrun.recipe == "speedrun"
    tweaked = parse("--recipe", "speedrun", "--epochs", "2", "--seeds", "0,1")
    assert tweaked.epochs == 2 and tweaked.seeds == (0, 1) and tweaked.learning_rates == (1e-2,)
    # a flag equal to TrainConfig's default still overrides a recipe that changed it
    assert parse("--recipe", "keras-cnn", "--model", "mlp").model == "mlp"
    assert TrainConfig.from_recipe("best", epochs=3).augment == RECIPES["best"]["augment"]
    assert parse() == TrainConfig.from_recipe("tutorial") == TrainConfig()
    with pytest.raises(UsageError, match="unknown recipe"):
        TrainConfig.from_recipe("fastest")


def test_best_trains_bncnn_with_less_dropout():
    best = TrainConfig.from_recipe("best").model_kwargs()
    assert (best["conv_dropout"], best["dense_dropout"]) == (0.1, 0.2)


def test_model_args_merge_into_the_recipes_with_the_users_keys_winning():
    zoomed = parse("--recipe", "best", "--model-args", '{"input_zoom": 1.1}').model_kwargs()
    assert (zoomed["input_zoom"], zoomed["conv_dropout"], zoomed["dense_dropout"]) == (1.1, 0.1, 0.2)
    mine = TrainConfig.from_recipe("best", model_args='{"conv_dropout": 0.0}').model_kwargs()
    assert (mine["conv_dropout"], mine["dense_dropout"]) == (0.0, 0.2)


def test_another_model_does_not_inherit_the_recipes_model_args():
    assert "conv_dropout" not in parse("--recipe", "best", "--model", "cnn").model_kwargs()
    kept = parse("--recipe", "best", "--model", "bncnn").model_kwargs()  # the recipe's own model
    assert kept["conv_dropout"] == 0.1


def test_model_args_that_are_not_a_json_object_are_named_in_the_error_even_over_a_recipe():
    for text in ("[1, 2]", "{not json"):
        with pytest.raises(UsageError, match=re.escape(text)):
            TrainConfig.from_recipe("best", model_args=text)


@pytest.mark.parametrize("argv,flag,owner", [
    (("--optimizer", "sgd", "--betas", "0.5,0.9"), "--betas", "--optimizer sgd"),
    (("--optimizer", "sgd", "--adam-eps", "1e-3"), "--adam-eps", "--optimizer sgd"),
    (("--momentum", "0.9",), "--momentum", "--optimizer adam"),  # the default optimizer
    (("--optimizer", "adam", "--weight-decay", "1e-4"), "--weight-decay", "--optimizer adam"),
    (("--recipe", "speedrun", "--optimizer", "adamw", "--momentum", "0.9"), "--momentum",
     "--optimizer adamw"),
    (("--warmup", "0.1",), "--warmup", "--lr-schedule constant"),
    (("--model", "cnn", "--dropout", "0.2"), "--dropout", "--model cnn"),
    (("--recipe", "best", "--hidden", "32"), "--hidden", "--model bncnn"),
    (("--impl", "xla",), "--impl", "--model mlp"),
    (("--model", "tests/assets/net.py:Net", "--dtype", "bfloat16"), "--dtype",
     "--model tests/assets/net.py:Net"),
])
def test_a_setting_the_run_would_ignore_is_a_usage_error_naming_both(argv, flag, owner):
    with pytest.raises(UsageError, match=f"^{flag} is a setting of .*; {owner} does not use it"):
        parse(*argv)


def test_an_explicit_warmup_of_zero_is_refused_by_the_one_cycle_schedule():
    with pytest.raises(UsageError, match="--warmup 0.0: the one-cycle"):
        parse("--lr-schedule", "onecycle", "--warmup", "0")
    assert parse("--lr-schedule", "cosine", "--warmup", "0").warmup == 0.0  # no warm-up


def test_keeping_checkpoints_that_are_never_written_is_refused():
    with pytest.raises(UsageError, match="--keep-checkpoints has nothing to keep"):
        parse("--checkpoint-every", "0", "--keep-checkpoints", "5")
    assert parse("--checkpoint-every", "2", "--keep-checkpoints", "5").keep_checkpoints == 5


def test_settings_pass_where_they_are_read():
    assert parse("--optimizer", "sgd", "--momentum", "0.9").momentum == 0.9
    assert parse("--optimizer", "adamw", "--weight-decay", "1e-4", "--betas", "0.8,0.99").betas \
        == (0.8, 0.99)
    assert parse("--lr-schedule", "cosine", "--warmup", "0.1").warmup == 0.1
    assert parse("--model", "cnn", "--impl", "xla", "--dtype", "bfloat16").impl == "xla"
    assert parse("--hidden", "32", "--dropout", "0.2").model_kwargs()["dropout"] == 0.2
    # a recipe's own values are not the user's: another optimizer or model leaves them unused
    assert parse("--recipe", "speedrun", "--optimizer", "sgd").optimizer == "sgd"
    assert parse("--recipe", "best", "--lr-schedule", "constant").warmup == 0.2


def test_config_json_records_the_recipe_and_every_resolved_value():
    saved = json.loads(json.dumps(parse("--recipe", "best", "--epochs", "2").to_dict()))
    assert saved["recipe"] == "best" and saved["epochs"] == 2
    assert saved["label_smoothing"] == RECIPES["best"]["label_smoothing"]
    assert TrainConfig.from_dict(saved) == parse("--recipe", "best", "--epochs", "2")


def test_help_lists_the_recipes(capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in RECIPES:
        assert name in text
    assert "--lr 0.01" in text  # what the speedrun recipe sets
