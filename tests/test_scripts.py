"""The research scripts (``scripts/``): those that judge a finished run keep to the honest
protocol (they read the run's validation digits, never its test set), and the record-scale
net of ``resnet_seeds.py`` is the one it describes.

Small synthetic digits, the MLP and narrow nets keep this fast; the scripts' real use is
on `best` and on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mnist_jax as mj

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax modules are dataclasses, which look their module up
    spec.loader.exec_module(module)
    return module


def train(digits: mj.Dataset, out: Path, **fields) -> Path:
    config = mj.TrainConfig(**{"epochs": 2, "batch_size": 64, "seeds": (0, 1),
                               "checkpoint_every": 1, **fields})
    mj.train_run(config, out, dataset=digits, progress=False, log=lambda line: None)
    return out


def test_eval_variants_scores_the_validation_digits_as_the_run_did(digits, tmp_path, capsys):
    run = train(digits, tmp_path / "run", validation_split=0.25)
    script = load_script("eval_variants")
    no_test_set = dataclasses.replace(digits, test_images=None, test_labels=None)
    assert script.report(mj.load_run(run), no_test_set) == 0
    out = capsys.readouterr().out

    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    val = [f"{a:.4f}" for a in last["val_accuracy"]]
    lines = {m[1].strip(): m[2] for m in re.finditer(r"^  (.{30}) (\S+ \S+) \|", out, re.MULTILINE)}
    # the plain prediction and the last checkpoint are the run's own final weights
    assert lines["none"].split() == val and lines["epoch 2"].split() == val
    assert set(lines) == set(script.TTA) | {"epoch 1", "epoch 2", "epoch 1+2"}
    assert "256 validation digits" in out


def test_eval_variants_refuses_a_run_without_a_validation_split(digits, tmp_path, capsys):
    run = train(digits, tmp_path / "run", epochs=1, seeds=(0,))
    assert load_script("eval_variants").main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "held out no validation split" in err and "\n" not in err


def test_record_net_pools_a_last_odd_row_alone_as_pytorch_ceil_mode():
    max_pool = load_script("resnet_seeds").max_pool
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))
    assert max_pool(x).shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(max_pool(x),
                                  nn.max_pool(x, (2, 2), (2, 2), ((0, 1), (0, 1))))
    even = x[:, :6, :6]
    np.testing.assert_array_equal(max_pool(even), nn.max_pool(even, (2, 2), (2, 2)))


def test_record_net_has_the_record_shape_and_batchnorm_statistics(digits):
    rs = load_script("resnet_seeds")
    shapes = jax.eval_shape(lambda: rs.RecordResNet().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)), train=False))
    kernels = {jax.tree_util.keystr(path[:1]): leaf.shape
               for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
               if path[-1].key == "kernel"}
    # conv 5x5 -> 128 (im2col: 25 taps), residual units 0-1 at 128; per stage a conv 3x3
    # to 256 / 512 and a residual unit; Dense 512 -> 10
    assert kernels == {"['Conv_0']": (25, 128), "['NormedResidual_0']": (9 * 128, 128),
                       "['NormedResidual_1']": (9 * 128, 128), "['Conv_1']": (9 * 128, 256),
                       "['NormedResidual_2']": (9 * 256, 256), "['Conv_2']": (9 * 256, 512),
                       "['NormedResidual_3']": (9 * 512, 512), "['Dense_0']": (512, 10)}

    narrow = rs.RecordResNet(widths=(4, 8, 8))
    x = digits.train_images[:32].astype(np.float32) / 255
    variables = narrow.init(jax.random.PRNGKey(0), x, train=False)
    logits, updated = narrow.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (32, 10)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updated["batch_stats"])
    assert all(jax.tree.leaves(moved))  # every BatchNorm learns its batch's statistics
    # evaluation uses the running statistics: a digit scores alike alone or in a batch
    np.testing.assert_allclose(narrow.apply(variables, x[:1], train=False),
                               narrow.apply(variables, x, train=False)[:1],
                               rtol=1e-5, atol=1e-5)


def test_nnx_tutorial_net_is_the_cnn_of_flax_s_nnx_tutorial():
    """Conv 1→32 and 32→64 (3x3), BatchNorm 32 and 64, Linear 3136→256→10: 824,650
    trainable parameters; the tutorial's adamw(0.005, 0.9) and batch 32 in the config."""
    from flax import nnx
    script = load_script("nnx_tutorial")
    params = nnx.state(nnx.eval_shape(lambda: script.CNN(rngs=nnx.Rngs(0))), nnx.Param)
    shapes = {jax.tree_util.keystr(path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
    assert shapes == {"['batch_norm1']['bias']": (32,), "['batch_norm1']['scale']": (32,),
                      "['batch_norm2']['bias']": (64,), "['batch_norm2']['scale']": (64,),
                      "['conv1']['bias']": (32,), "['conv1']['kernel']": (3, 3, 1, 32),
                      "['conv2']['bias']": (64,), "['conv2']['kernel']": (3, 3, 32, 64),
                      "['linear1']['bias']": (256,), "['linear1']['kernel']": (3136, 256),
                      "['linear2']['bias']": (10,), "['linear2']['kernel']": (256, 10)}
    assert sum(int(np.prod(s)) for s in shapes.values()) == 824_650

    config = script.tutorial_config((0, 1), 1)
    assert config.batch_size == 32
    # the optimizer the config builds takes the steps optax.adamw(0.005, 0.9) takes
    from mnist_jax.run import build_optimizer
    ours, theirs = build_optimizer(config), __import__("optax").adamw(0.005, 0.9)
    params = {"w": jnp.linspace(-10.0, 10.0, 12).reshape(3, 4)}  # weight decay shows
    s1, s2 = ours.init(params), theirs.init(params)
    for i in range(3):
        grads = {"w": jnp.cos(params["w"] * (i + 1))}
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = theirs.update(grads, s2, params)
        # (the config's optimizer holds b2 as a float32 array: its bias correction 1 - b2
        # differs from optax's Python-float one in the 5th digit, hence 1e-4)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-4, atol=0)


def test_nnx_tutorial_trains_its_seeds_in_one_program_into_a_run_folder(digits, tmp_path):
    script = load_script("nnx_tutorial")
    run = tmp_path / "run"
    outcome = script.train(script.tutorial_config((0, 1), 1), run, dataset=digits,
                           progress=False)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs_completed"] == 1
    accs = [m["test_accuracy"] for m in results["per_model"]]
    assert [m["seed"] for m in results["per_model"]] == [0, 1]
    assert min(accs) > 0.5  # each seed learned the toy digits in one epoch of 32 steps
    assert accs[0] != accs[1] or not np.array_equal(  # two models, not one twice
        *(np.asarray(outcome.result.state.params["linear2"]["kernel"][i]) for i in (0, 1)))
    lines = script.accuracy_lines(outcome)
    assert lines[-1].startswith(f"test accuracy {np.mean(accs):.4f} ± {np.std(accs):.4f} "
                                "(mean ± std over 2 seeds, epoch 1)")
    saved = json.loads((run / "config.json").read_text())
    assert (saved["optimizer"], saved["learning_rates"], saved["betas"], saved["batch_size"]) \
        == ("adamw", [0.005], [0.9, 0.999], 32)
    assert saved["model"].endswith(":CNN")
    loaded = mj.load_run(run)  # the run folder rebuilds the NNX model: evaluate seed 1
    one = mj.evaluate(loaded.model_state(1), digits.test_images, digits.test_labels)
    assert one["accuracy"] == accs[1]


def test_nnx_tutorial_refuses_in_one_line_before_training(tmp_path, capsys):
    script = load_script("nnx_tutorial")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert script.main(["--out", str(tmp_path / "run"), "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "\n" not in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]
