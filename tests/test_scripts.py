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
