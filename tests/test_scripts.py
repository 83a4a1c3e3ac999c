"""The research scripts that judge a finished run (``scripts/``) keep to the honest
protocol: they read the run's validation digits, never its test set.

Small synthetic digits and the MLP keep this fast; the script's real use is on `best`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import mnist_jax as mj

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
