"""``mnist-jax export`` / ``mnist_jax.export.export``: a run as an ONNX or StableHLO file that
gives the answers mnist-jax gives, for the built-in models and linen and NNX models of a
user's; what cannot be exported is refused in one line and leaves no file.

The runs are tiny (synthetic digits, one epoch); the export check runs on a small batch
except in the one test that reads the real test set. ONNX needs the ``export`` extra.
"""

from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import mnist_jax as mj
from mnist_jax import cli
from mnist_jax.data import synthetic_digits
from mnist_jax.errors import DataError, UsageError
from mnist_jax.usermodel import build_user_model, load_model_class

# the module (mnist_jax.export, the attribute, is its function)
export_lib = importlib.import_module("mnist_jax.export")

ASSETS = Path(__file__).resolve().parent / "assets"
FORMATS = ("onnx", "stablehlo")

NNX_NET = """
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, features: int = 4, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, features, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.norm = nnx.BatchNorm(features, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(13 * 13 * features, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x[..., None])))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.out(self.dropout(x.reshape(x.shape[0], -1))).astype(jnp.float32)
"""

class CallbackMLP(mj.MLP):
    """The MLP, calling a host function at inference: Python called from the program,
    which neither format can hold."""

    def __call__(self, x, *, train: bool):
        x = super().__call__(x, train=train)
        return jax.pure_callback(np.negative, jax.ShapeDtypeStruct(x.shape, x.dtype), -x)


# model name -> (--model, --model-args, seeds)
RUNS = {
    "mlp": ("mlp", '{"hidden": [32]}', (0, 1)),
    "cnn": ("cnn", '{"features": [4, 8], "dense": [16]}', (0,)),
    "bncnn": ("bncnn", '{"features": [4, 8], "pool_after": [true, true], "dense": 16}', (0,)),
    "linen": (f"{ASSETS / 'net.py'}:Net", '{"features": [4], "hidden": 16}', (0,)),
    "nnx": ("NNX", None, (0,)),
}


def _model(spec: str, args: str | None, folder: Path):
    if spec == "NNX":  # the class, as an NNX user passes it (mj.fit(..., model=Net))
        path = folder / "nnx_net.py"
        path.write_text(textwrap.dedent(NNX_NET))
        return functools.partial(load_model_class(f"{path}:Net"), features=4)
    if ":" in spec:
        return build_user_model(spec, args)
    return None


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory) -> dict[str, Path]:
    """One finished run folder per model: one epoch on the toy digits."""
    root = tmp_path_factory.mktemp("export_runs")
    out = {}
    for name, (spec, args, seeds) in RUNS.items():
        model = _model(spec, args, root)
        config = mj.TrainConfig(model=spec if model is None else "mlp", model_args=args
                                if model is None else None, epochs=1, batch_size=128,
                                seeds=seeds)
        mj.train_run(config, root / name, model=model, dataset=digits, progress=False,
                     log=lambda line: None)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def batches() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    digits, _ = synthetic_digits(rng, 1000)
    noise = rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    mixed = np.where(rng.random((1000, 1, 1)) < 0.5, digits, noise).astype(np.uint8)
    return {n: mixed[:n] for n in (1, 7, 1000)}


def _needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("jax2onnx", reason="ONNX export needs the export extra "
                            "(pip install -e '.[export]')")
        pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")


def run_file(path: Path, fmt: str, images: np.ndarray) -> np.ndarray:
    """The file run as its users run it: onnxruntime, or jax.export.deserialize."""
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.type, inp.shape) == ("images", "tensor(uint8)", ["N", 28, 28])
        assert (out.name, out.type, out.shape) == ("probabilities", "tensor(float)", ["N", 10])
        return session.run(None, {"images": images})[0]
    import jax
    return np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(images))


def _export(run: Path, fmt: str, out: Path, batches, **kw) -> export_lib.Exported:
    lines: list[str] = []
    done = export_lib.export(run, out, format=fmt, check_images=batches[1000], log=lines.append,
                             **kw)
    assert lines == [f"checked: {done.check}"]
    assert done.check.startswith("same class on 1000/1000 digits given, max |p - p_jax| ")
    return done


def _agree(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=0, atol=export_lib.TOLERANCE)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "bncnn", "linen", "nnx"])
def test_the_file_gives_mnist_jaxs_probabilities_for_any_batch(name, fmt, runs, batches,
                                                                 tmp_path):
    _needs(fmt)
    done = _export(runs[name], fmt, tmp_path / f"m.{fmt}", batches)
    state = mj.load_run(runs[name]).model_state(0)
    for n, images in batches.items():
        _agree(run_file(done.path, fmt, images), mj.predict(state, images))
    assert sorted(p.name for p in tmp_path.iterdir()) == (  # no temporary file left
        ["m.onnx"] if fmt == "onnx" else ["m.stablehlo", "m.stablehlo.json"])


def test_the_onnx_cnn_is_made_of_convolutions_not_their_im2col_pieces(runs, batches, tmp_path):
    _needs("onnx")
    import onnx
    done = _export(runs["cnn"], "onnx", tmp_path / "cnn.onnx", batches)
    model = onnx.load(str(done.path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MaxPool") == 1
    assert [(o.domain, o.version) for o in model.opset_import] == [("", export_lib.OPSET)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_ensemble_is_the_mean_of_its_members_and_model_index_picks_one(fmt, runs, batches,
                                                                         tmp_path):
    _needs(fmt)
    loaded = mj.load_run(runs["mlp"])
    members = [mj.predict(loaded.model_state(i), batches[1000]) for i in range(2)]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # two different models
    ens = _export(loaded, fmt, tmp_path / f"ens.{fmt}", batches, ensemble=True)
    _agree(run_file(ens.path, fmt, batches[1000]), (members[0] + members[1]) / 2)
    one = _export(loaded, fmt, tmp_path / f"one.{fmt}", batches, model_index=1)
    _agree(run_file(one.path, fmt, batches[1000]), members[1])
    assert (ens.members, one.members) == ([0, 1], [1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_metadata_records_the_model_recipe_accuracy_version_and_commit(fmt, runs, batches,
                                                                           tmp_path):
    _needs(fmt)
    done = _export(runs["mlp"], fmt, tmp_path / f"ens.{fmt}", batches, ensemble=True)
    if fmt == "onnx":
        import onnx
        meta = {p.key: p.value for p in onnx.load(str(done.path)).metadata_props}
    else:
        meta = json.loads(done.metadata_path.read_text())
        assert done.metadata_path == tmp_path / "ens.stablehlo.json"
        assert set(meta["platforms"].split(",")) >= {"cpu", "cuda"}
    results = json.loads((runs["mlp"] / "results.json").read_text())
    assert meta["model"] == "mlp" and json.loads(meta["model_args"]) == {"hidden": [32]}
    assert meta["recipe"] == results["config"]["recipe"]
    assert json.loads(meta["test_accuracy"]) == results["ensemble_test_accuracy"]
    assert meta["mnist_jax_version"] == mj.__version__
    assert meta["trained_commit"] == str(results["git_commit"])


def test_the_stablehlo_file_runs_in_bare_jax_without_mnist_jax_or_flax(runs, batches, tmp_path):
    done = _export(runs["cnn"], "stablehlo", tmp_path / "cnn.stablehlo", batches)
    probs = _in_a_bare_process(tmp_path, batches[7], ("mnist_jax", "flax", "optax"), f"""
        import jax
        exp = jax.export.deserialize(bytearray(open({str(done.path)!r}, "rb").read()))
        p = np.asarray(exp.call(x))
    """)
    _agree(probs, mj.predict(mj.load_run(runs["cnn"]).model_state(0), batches[7]))


def _in_a_bare_process(tmp_path: Path, x: np.ndarray, absent: tuple[str, ...],
                       body: str) -> np.ndarray:
    """The probabilities ``p`` that ``body`` computes from ``x`` in a fresh Python process,
    which must end without having imported any of ``absent``."""
    np.save(tmp_path / "x.npy", x)
    script = (f"import sys, numpy as np\nx = np.load({str(tmp_path / 'x.npy')!r})\n"
              + textwrap.dedent(body)
              + f"np.save({str(tmp_path / 'p.npy')!r}, p)\n"
              + f"print(sorted(m for m in {absent!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    return np.load(tmp_path / "p.npy")


def test_the_onnx_file_runs_in_onnxruntime_without_jax(runs, batches, tmp_path):
    _needs("onnx")
    done = _export(runs["bncnn"], "onnx", tmp_path / "bn.onnx", batches)
    probs = _in_a_bare_process(tmp_path, batches[7], ("jax", "mnist_jax", "flax"), f"""
        import onnxruntime as ort
        s = ort.InferenceSession({str(done.path)!r}, providers=["CPUExecutionProvider"])
        p = s.run(None, {{"images": x}})[0]
    """)
    _agree(probs, mj.predict(mj.load_run(runs["bncnn"]).model_state(0), batches[7]))


# ---------------------------------------------------------------------------------------
# The command line, and what it refuses
# ---------------------------------------------------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["export", *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-jax"), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.realdata
def test_the_cli_checks_the_file_on_the_10000_test_digits(runs, mnist, mnist_dir, capsys):
    code, out, err = _cli(capsys, str(runs["mlp"]), "--format", "stablehlo", "--data-dir",
                          str(mnist_dir))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("checked: same class on 10000/10000 test digits, max |p - p_jax| ")
    assert "model 0 of 2 (the default; --model-index I picks another" in lines[1]
    assert (runs["mlp"] / "export" / "model-0.stablehlo").is_file()
    assert (runs["mlp"] / "export" / "model-0.stablehlo.json").is_file()


def test_without_data_the_cli_checks_synthetic_digits_and_says_so(runs, tmp_path, capsys):
    out_file = tmp_path / "e.stablehlo"
    code, out, err = _cli(capsys, str(runs["mlp"]), "--format", "stablehlo", "--ensemble",
                          "--out", str(out_file), "--data-dir", str(tmp_path / "nothing"))
    assert code == 0, err
    assert "no test data" in out and "synthetic digits" in out
    assert "checked: same class on 1000/1000 synthetic digits" in out
    assert "the ensemble (mean of the 2 models' probabilities)" in out and out_file.is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_op_the_format_cannot_express_is_one_line_exit_2_and_no_file(fmt, runs, tmp_path,
                                                                        capsys, monkeypatch):
    _needs(fmt)
    from mnist_jax import lifecycle
    callback = lifecycle.load_run(runs["mlp"], model=CallbackMLP(hidden=(32,)))
    monkeypatch.setattr(lifecycle, "load_run", lambda run_dir: callback)
    out_file = tmp_path / f"x.{fmt}"
    code, _, err = _cli(capsys, str(runs["mlp"]), "--format", fmt, "--out", str(out_file),
                        "--data-dir", str(tmp_path))
    assert code == 2
    _one_error(err, "pure_callback", fmt)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_disagrees_with_jax_is_refused_exit_1_and_removed(runs, tmp_path, capsys,
                                                                      monkeypatch):
    real = export_lib.RUNNERS["stablehlo"]
    monkeypatch.setitem(export_lib.RUNNERS, "stablehlo",
                        lambda path, x: real(path, x) + np.float32(3e-5))
    out_file = tmp_path / "x.stablehlo"
    code, _, err = _cli(capsys, str(runs["mlp"]), "--format", "stablehlo", "--out",
                        str(out_file), "--data-dir", str(tmp_path))
    assert code == 1
    _one_error(err, "disagrees with JAX", "max |p - p_jax| 3e-05")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(runs, tmp_path, monkeypatch):
    def interrupted(path, x):
        raise KeyboardInterrupt
    monkeypatch.setitem(export_lib.RUNNERS, "stablehlo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export(runs["mlp"], tmp_path / "x.stablehlo", format="stablehlo",
                          check_images=np.zeros((2, 28, 28), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_another_class_even_within_the_tolerance():
    want = np.array([[0.5 + 1e-6, 0.5 - 1e-6]], np.float64)
    with pytest.raises(DataError, match="same class on 0/1"):
        export_lib.compare(want[:, ::-1].astype(np.float32), want, "digits")


def test_bad_requests_are_one_line_with_their_exit_code(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((runs["cnn"] / "config.json").read_text())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        ([str(tmp_path / "missing"), "--format", "onnx"], 2, "no run folder"),
        ([str(a_file.parent), "--format", "stablehlo"], 2, "not a run folder"),
        ([str(unfinished), "--format", "stablehlo"], 2, "did not finish"),
        ([str(runs["cnn"]), "--format", "tflite"], 2, "invalid choice: 'tflite'"),
        ([str(runs["mlp"]), "--format", "stablehlo", "--model-index", "2"], 2,
         "invalid --model-index 2: the run trained 2 model(s), 0..1"),
        ([str(runs["mlp"]), "--format", "stablehlo", "--model-index", "1", "--ensemble"], 2,
         "not allowed with argument"),
        ([str(runs["cnn"]), "--format", "stablehlo", "--ensemble"], 2,
         "--ensemble needs a run of several models"),
        ([str(runs["cnn"]), "--format", "stablehlo", "--out", str(a_file / "x.stablehlo")], 2,
         "is a file, not a folder"),
        ([str(runs["cnn"]), "--format", "stablehlo", "--out", str(tmp_path)], 2,
         "it is a folder"),
    ]
    for argv, want_code, words in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == want_code, (argv, err)
        _one_error(err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "unfinished"]
    assert not (runs["cnn"] / "export").exists()


def test_the_api_refuses_an_unknown_format_and_names_the_extra_when_onnx_is_missing(
        runs, monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="unknown format 'tflite'"):
        export_lib.export(runs["mlp"], tmp_path / "x", format="tflite")
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'mnist-jax\[export\]'"):
        export_lib.export(runs["mlp"], tmp_path / "x.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


class BatchSizedMLP(mj.MLP):
    """The MLP, using the batch size as a Python number: no file can serve every N."""

    def __call__(self, x, *, train: bool):
        return super().__call__(x, train=train) * float(int(x.shape[0]) % 3 + 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_model_that_needs_a_concrete_batch_size_is_refused_in_one_line(fmt, runs, tmp_path):
    _needs(fmt)
    loaded = mj.load_run(runs["mlp"], model=BatchSizedMLP(hidden=(32,)))
    with pytest.raises(UsageError, match="does not trace for a batch of symbolic size N") as e:
        export_lib.export(loaded, tmp_path / f"x.{fmt}", format=fmt,
                          check_images=np.zeros((2, 28, 28), np.uint8))
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
