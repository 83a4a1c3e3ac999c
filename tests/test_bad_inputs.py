"""Bad input, everywhere: a table of cases run through the real ``mnist-jax`` CLI.

Every case runs ``mnist_jax.cli.main(argv)`` in-process (stdout/stderr captured at the file
descriptors) and asserts, for an expected failure:

* exit code 1 (bad data, image or saved run) or 2 (bad request / flag),
* stderr is ONE line, ``mnist-jax: ...``, naming the problem (case-specific words),
* no "Traceback" anywhere,
* nothing already saved changed: the files of every run folder the case touches are hashed
  before and after (and a fresh ``--out`` folder is not left looking like a run).

Some inputs in the table are unusual but VALID (animated GIF, 16-bit PNG, alpha, CMYK, …):
those must predict normally (exit 0, one JSON object). A few cases also run as subprocesses
(``python -m mnist_jax.cli``) to show that nothing reaches the terminal but the one line.

The suite is self-contained: it trains a tiny MLP on a small synthetic IDX folder, so it
needs neither the real MNIST files nor a warm cache. ``CASES`` is the table; its size is
printed by ``test_case_table_is_counted``.
"""

from __future__ import annotations

import builtins
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from mnist_jax import cli
from mnist_jax.data import IDX_FILES, load_dataset

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 256, 64


# ---------------------------------------------------------------------------------------
# fixtures: a small synthetic data folder and a run trained on it (once per session)
# ---------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None,
              dims: tuple[int, ...] | None = None) -> Path:
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    raw = struct.pack(f">I{len(dims)}I", magic, *dims) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def digit_like(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright bar position: learnable, MNIST-shaped, uint8."""
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 + 2 * c : 6 + 2 * c, 6:22] = 255
    return images, labels


def make_data(folder: Path, **override: np.ndarray) -> Path:
    """The four IDX files, uncompressed (so the plain reader reads them, no tfds)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tx, ty = digit_like(N_TRAIN, rng)
    vx, vy = digit_like(N_TEST, rng)
    arrays = {"train_images": tx, "train_labels": ty, "test_images": vx,
              "test_labels": vy} | override
    for key, stem in IDX_FILES.items():
        write_idx(folder / stem, arrays[key])
    return folder


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr); SystemExit is an exit too."""
    capfd.readouterr()
    try:
        with warnings.catch_warnings():  # Python's default filters, as in a real run
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                             ResourceWarning):
                warnings.simplefilter("ignore", category)
            code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """Pristine shared inputs (never modified by a case): data folder, trained run."""
    root = tmp_path_factory.mktemp("bad_inputs_world")
    data = make_data(root / "data")
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:  # keep the synthetic data out of the real cache
        mp.setenv("MNIST_JAX_CACHE_DIR", str(root / "cache"))
        code = cli.main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "2",
                         "--batch-size", "32", "--quiet"])
    assert code == 0 and (run / "params.msgpack").is_file()
    return {"data": data, "run": run}


@dataclasses.dataclass
class Ctx:
    """What a case builds its inputs in: a fresh tmp folder plus the shared world."""

    tmp: Path
    world: dict[str, Path]
    guarded: list[Path] = dataclasses.field(default_factory=list)

    @property
    def run(self) -> Path:  # read-only use (predict/evaluate must not write)
        self.guarded.append(self.world["run"])
        return self.world["run"]

    @property
    def data(self) -> Path:
        return self.world["data"]

    def run_copy(self, name: str = "run") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.world["run"], dst)
        self.guarded.append(dst)
        return dst

    def data_copy(self, **override: np.ndarray) -> Path:
        return make_data(self.tmp / "data", **override)

    def train(self, *flags: object, out: Path | None = None, data: Path | None = None) -> list:
        out = out if out is not None else self.tmp / "new_run"
        return ["train", "--data-dir", data or self.data, "--out", out, "--epochs", "1",
                "--batch-size", "32", "--quiet", *flags]

    def image(self, name: str, img: Image.Image | bytes, **save) -> Path:
        path = self.tmp / name
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            img.save(path, **save)
        return path

    def predict(self, *inputs: object) -> list:
        return ["predict", self.run, *inputs, "--json", "--quiet"]


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (relative names), {} when absent."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# image makers
# ---------------------------------------------------------------------------------------
def ink_digit(size: int = 120, mode: str = "L") -> Image.Image:
    """A dark '1'-ish stroke and bar on light paper."""
    a = np.full((size, size), 245, np.uint8)
    s = size // 8
    a[2 * s : 6 * s, 4 * s - s // 3 : 4 * s + s // 3] = 20
    a[2 * s : 2 * s + s // 2, 3 * s : 4 * s] = 20
    img = Image.fromarray(a)
    return img if mode == "L" else img.convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def animated_gif(ctx: Ctx) -> Path:
    frames = [ink_digit().convert("P"), Image.new("P", (120, 120), 255)]
    path = ctx.tmp / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    return path


def sixteen_bit(ctx: Ctx) -> Path:
    a = (np.asarray(ink_digit(), np.uint16) * 257)
    img = Image.fromarray(a)  # mode I;16
    assert img.mode in ("I;16", "I")
    return ctx.image("deep.png", img)


def with_alpha(ctx: Ctx) -> Path:
    """Black ink drawn only through alpha on a transparent background (RGBA)."""
    ink = 255 - np.asarray(ink_digit())
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = ink
    return ctx.image("alpha.png", Image.fromarray(rgba, "RGBA"))


def gray_alpha(ctx: Ctx) -> Path:
    return ctx.image("la.png", ink_digit().convert("LA"))


def palette(ctx: Ctx) -> Path:
    return ctx.image("palette.png", ink_digit().convert("RGB").convert("P"))


def bilevel(ctx: Ctx) -> Path:
    return ctx.image("bw.bmp", ink_digit().convert("1"))


def cmyk_jpeg(ctx: Ctx) -> Path:
    return ctx.image("cmyk.jpg", ink_digit().convert("CMYK"))


def big_valid(ctx: Ctx) -> Path:
    return ctx.image("big.png", ink_digit(3000), compress_level=1)


def exif_rotated(ctx: Ctx) -> Path:
    img = ink_digit(mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    return ctx.image("rotated.jpg", img, exif=exif)


def huge(ctx: Ctx) -> Path:
    """10000×10000 pixels (100 MP): over the 50 MP decompression-bomb limit."""
    return ctx.image("huge.png", Image.new("L", (10000, 10000), 255), compress_level=1)


def truncated_png(ctx: Ctx) -> Path:
    b = png_bytes(ink_digit())
    return ctx.image("cut.png", b[: len(b) // 2])


def folder_mixed(ctx: Ctx) -> Path:
    d = ctx.tmp / "mixed"
    d.mkdir()
    ink_digit().save(d / "a_good.png")
    (d / "b_bad.png").write_text("not a png")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def folder_without_images(ctx: Ctx) -> Path:
    d = ctx.tmp / "docs"
    d.mkdir()
    (d / "readme.txt").write_text("no images here")
    (d / ".hidden.png").write_bytes(png_bytes(ink_digit()))
    return d


# ---------------------------------------------------------------------------------------
# run-folder damage
# ---------------------------------------------------------------------------------------
def edit_config(run: Path, **changes) -> Path:
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(changes)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def damaged(run: Path, name: str, payload: bytes | Callable[[bytes], bytes]) -> Path:
    p = run / name
    p.write_bytes(payload(p.read_bytes()) if callable(payload) else payload)
    return run


def without(run: Path, name: str) -> Path:
    p = run / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    return run


def damage_checkpoints(run: Path) -> Path:
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 7)
    return run


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    group: str  # data | image | cli | run | train
    argv: Callable[[Ctx], list]
    code: int  # expected exit code; 0 = a valid input that must work
    names: tuple[str, ...] = ()  # words the error line must contain (case-insensitive)
    deny_read: str | None = None  # simulate "permission denied" on files whose name has this
    warnings_ok: bool = False  # "mnist-jax: warning: ..." lines may precede the error line


def case(id, group, argv, code, *names, deny_read=None, warnings_ok=False) -> Case:
    return Case(id, group, argv, code, tuple(names), deny_read, warnings_ok)


NNX_NET = ROOT / "tests" / "assets" / "nnx_net.py"


def nnx_bad(name: str) -> str:
    return f"{ROOT / 'tests' / 'assets' / 'nnx_bad.py'}:{name}"


T, R, P = "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"
rng = np.random.default_rng(1)

CASES: list[Case] = [
    # ---- data files (train --data-dir) ------------------------------------------------
    case("data-folder-missing", "data", lambda c: c.train(data=c.tmp / "nope"), 1,
         "nope", "does not exist"),
    case("data-folder-is-a-file", "data", lambda c: c.train(data=c.image("f.bin", b"x")), 1,
         "f.bin"),
    case("data-file-missing", "data",
         lambda c: c.train(data=without(c.data_copy(), R)), 1, "missing", R),
    case("data-file-empty", "data",
         lambda c: c.train(data=damaged(c.data_copy(), T, b"")), 1, T, "empty"),
    case("data-gzip-truncated", "data",
         lambda c: c.train(data=_gz_truncated(c.data_copy())), 1, T + ".gz", "gzip"),
    case("data-wrong-magic", "data",
         lambda c: c.train(data=damaged(c.data_copy(), T, lambda b: b"\0\0\x0c\x03" + b[4:])), 1,
         T, "magic"),
    case("data-payload-truncated", "data",
         lambda c: c.train(data=damaged(c.data_copy(), T, lambda b: b[:-100])), 1,
         T, "truncated"),
    case("data-wrong-dimensions", "data",
         lambda c: c.train(data=c.data_copy(train_images=np.zeros((N_TRAIN, 28, 27)))), 1,
         T, "(N, 28, 28)"),
    case("data-fewer-labels-than-images", "data",
         lambda c: c.train(data=c.data_copy(train_labels=np.arange(N_TRAIN - 5) % 10)), 1,
         R, f"{N_TRAIN - 5} labels for {N_TRAIN} images"),
    case("data-label-out-of-range", "data",
         lambda c: c.train(data=c.data_copy(train_labels=np.full(N_TRAIN, 10))), 1,
         R, "label 10", "0..9"),
    case("data-directory-instead-of-file", "data",
         lambda c: c.train(data=_dir_for_file(c.data_copy(), P)), 1, P, "directory"),
    case("data-file-unreadable", "data", lambda c: c.train(data=c.data_copy()), 1,
         R, "permission denied", deny_read=R),
    case("data-bad-with-overwrite-keeps-old-run", "data",
         lambda c: c.train("--overwrite", out=c.run_copy(),
                           data=damaged(c.data_copy(), T, b"")), 1, T, "empty"),
    case("data-bad-on-evaluate", "data",
         lambda c: ["evaluate", c.run, "--data-dir", damaged(c.data_copy(), P, b"")], 1,
         P, "empty"),
    case("data-no-folder-and-no-network", "data",  # no folder: download, here refused
         lambda c: ["train", "--out", c.tmp / "r", "--quiet"], 1, "could not download",
         "--data-dir DIR", "MNIST_JAX_DATA_DIR"),
    case("idx-input-wrong-dimensions", "data",
         lambda c: c.predict(write_idx(c.tmp / "x-idx3-ubyte", np.zeros((3, 20, 20)))), 1,
         "x-idx3-ubyte", "28"),
    case("idx-input-truncated", "data",
         lambda c: c.predict(c.image("y-idx3-ubyte", struct.pack(">IIII", 0x803, 5, 28, 28)
                                     + b"\0" * 100)), 1, "y-idx3-ubyte", "truncated"),
    # ---- images (predict RUN FILE...) ---------------------------------------------------
    case("image-not-an-image", "image",
         lambda c: c.predict(c.image("text.png", b"hello, not a picture\n")), 1,
         "text.png", "not an image"),
    case("image-zero-bytes", "image", lambda c: c.predict(c.image("zero.png", b"")), 1,
         "zero.png", "empty"),
    case("image-1x1", "image",
         lambda c: c.predict(c.image("dot.png", Image.new("L", (1, 1), 0))), 1,
         "dot.png", "no digit"),
    case("image-blank-page", "image",
         lambda c: c.predict(c.image("blank.jpg", Image.new("RGB", (200, 150), "white"))), 1,
         "blank.jpg", "no digit"),
    case("image-10000x10000", "image", lambda c: c.predict(huge(c)), 1,
         "huge.png", "too large"),
    case("image-truncated", "image", lambda c: c.predict(truncated_png(c)), 1,
         "cut.png", "truncated"),
    case("image-missing", "image", lambda c: c.predict(c.tmp / "ghost.png"), 1,
         "ghost.png", "no such file"),
    case("image-unreadable", "image",
         lambda c: c.predict(c.image("locked.png", ink_digit())), 1,
         "locked.png", "permission denied", deny_read="locked.png"),
    case("image-folder-without-images", "image",
         lambda c: c.predict(folder_without_images(c)), 1, "docs", "no image files"),
    case("image-folder-with-one-bad-file", "image",
         lambda c: c.predict(folder_mixed(c)), 1, "b_bad.png", "skipped"),
    case("valid-animated-gif", "image", lambda c: c.predict(animated_gif(c)), 0),
    case("valid-16-bit-png", "image", lambda c: c.predict(sixteen_bit(c)), 0),
    case("valid-alpha-only-ink", "image", lambda c: c.predict(with_alpha(c)), 0),
    case("valid-gray-alpha", "image", lambda c: c.predict(gray_alpha(c)), 0),
    case("valid-palette", "image", lambda c: c.predict(palette(c)), 0),
    case("valid-1-bit-bmp", "image", lambda c: c.predict(bilevel(c)), 0),
    case("valid-cmyk-jpeg", "image", lambda c: c.predict(cmyk_jpeg(c)), 0),
    case("valid-exif-rotated-jpeg", "image", lambda c: c.predict(exif_rotated(c)), 0),
    case("valid-3000x3000", "image", lambda c: c.predict(big_valid(c)), 0),
    # ---- CLI values (train) ---------------------------------------------------------------
    case("cli-epochs-zero", "cli", lambda c: c.train("--epochs", "0"), 2, "--epochs", "0"),
    case("cli-epochs-negative", "cli", lambda c: c.train("--epochs", "-3"), 2, "--epochs"),
    case("cli-epochs-not-a-number", "cli", lambda c: c.train("--epochs", "ten"), 2,
         "--epochs", "ten"),
    case("cli-batch-size-zero", "cli", lambda c: c.train("--batch-size", "0"), 2,
         "--batch-size"),
    case("cli-batch-larger-than-data", "cli", lambda c: c.train("--batch-size", "5000"), 2,
         "--batch-size", "5000", str(N_TRAIN)),
    case("cli-batch-larger-than-data-after-validation-split", "cli",
         lambda c: c.train("--batch-size", "200", "--validation-split", "0.5"), 2,
         "--batch-size", "200"),
    case("cli-batch-too-large-with-overwrite-keeps-old-run", "cli",
         lambda c: c.train("--batch-size", "5000", "--overwrite", out=c.run_copy()), 2,
         "--batch-size"),
    case("cli-unknown-model", "cli", lambda c: c.train("--model", "resnet"), 2,
         "--model", "resnet"),
    # ---- NNX models that cannot be MNIST classifiers (--model file.py:Class) -----------
    case("nnx-constructor-raises", "cli", lambda c: c.train("--model", nnx_bad("Raises")), 2,
         "Raises", "constructor failed", "width must be even"),
    case("nnx-constructor-takes-no-rngs", "cli",
         lambda c: c.train("--model", nnx_bad("NoRngs")), 2, "NoRngs", "no rngs"),
    case("nnx-forward-fails", "cli", lambda c: c.train("--model", nnx_bad("ForwardFails")), 2,
         "ForwardFails", "forward pass fails", "(B, 28, 28)"),
    case("nnx-seven-classes", "cli", lambda c: c.train("--model", nnx_bad("SevenClasses")), 2,
         "SevenClasses", "(2, 7)", "(B, 10)"),
    case("nnx-integer-output", "cli", lambda c: c.train("--model", nnx_bad("IntegerOutput")), 2,
         "IntegerOutput", "int32", "floating point"),
    case("nnx-not-a-module", "cli", lambda c: c.train("--model", nnx_bad("NotAModule")), 2,
         "NotAModule", "neither a flax.linen Module nor an NNX Module"),
    case("nnx-model-args-rngs", "cli",
         lambda c: c.train("--model", f"{NNX_NET}:Net", "--model-args", '{"rngs": 1}'), 2,
         "--model-args", "rngs"),
    case("nnx-model-args-unknown", "cli",
         lambda c: c.train("--model", f"{NNX_NET}:Net", "--model-args", '{"widht": 8}'), 2,
         "--model-args", "widht"),
    case("nnx-model-args-wrong-type", "cli",
         lambda c: c.train("--model", f"{NNX_NET}:Net", "--model-args", '{"hidden": "wide"}'),
         2, "--model-args", "hidden", "int"),
    case("cli-model-args-not-json", "cli",
         lambda c: c.train("--model", "cnn", "--model-args", "{conv_dropout: 0}"), 2,
         "--model-args", "JSON"),
    case("cli-model-args-unknown-field", "cli",
         lambda c: c.train("--model", "cnn", "--model-args", '{"dropuot": 0.1}'), 2,
         "--model-args", "dropuot"),
    case("cli-model-args-wrong-type", "cli",
         lambda c: c.train("--model", "cnn", "--model-args", '{"conv_dropout": "low"}'), 2,
         "--model-args", "conv_dropout", "float"),
    case("cli-model-args-dropout-above-1", "cli",
         lambda c: c.train("--model", "cnn", "--model-args", '{"conv_dropout": 1.5}'), 2,
         "--model-args", "conv_dropout", "[0, 1]"),
    case("cli-model-args-pooled-below-one-pixel", "cli",  # fails only when traced
         lambda c: c.train("--model", "bncnn", "--model-args",
                           '{"features": [8, 8, 8, 8, 8], "pool_after": [true, true, true, true, true]}'),
         2, "--model-args", "for bncnn"),
    case("cli-unknown-dataset", "cli", lambda c: c.train("--dataset", "cifar"), 2, "cifar"),
    case("cli-lr-nan", "cli", lambda c: c.train("--lr", "nan"), 2, "--lr", "nan"),
    case("cli-lr-inf", "cli", lambda c: c.train("--lr", "inf"), 2, "--lr", "inf"),
    case("cli-lr-negative", "cli", lambda c: c.train("--lr", "-0.1"), 2, "--lr"),
    case("cli-lr-zero", "cli", lambda c: c.train("--lr", "0"), 2, "--lr"),
    case("cli-lr-not-a-number", "cli", lambda c: c.train("--lr", "fast"), 2, "--lr", "fast"),
    case("cli-lr-repeated", "cli", lambda c: c.train("--lr", "1e-3,1e-3"), 2, "--lr",
         "distinct"),
    case("cli-betas-with-sgd", "cli",
         lambda c: c.train("--optimizer", "sgd", "--betas", "0.5,0.9"), 2, "--betas", "sgd"),
    case("cli-momentum-with-adam", "cli", lambda c: c.train("--momentum", "0.9"), 2,
         "--momentum", "adam"),
    case("cli-dropout-with-cnn", "cli", lambda c: c.train("--model", "cnn", "--dropout", "0.2"),
         2, "--dropout", "--model cnn", "--model-args"),
    case("cli-warmup-with-constant-rate", "cli", lambda c: c.train("--warmup", "0.1"), 2,
         "--warmup", "--lr-schedule constant"),
    case("cli-dropout-above-1", "cli", lambda c: c.train("--dropout", "1.5"), 2, "--dropout"),
    case("cli-validation-split-1", "cli", lambda c: c.train("--validation-split", "1"), 2,
         "--validation-split"),
    case("cli-seed-negative", "cli", lambda c: c.train("--seed", "-1"), 2, "--seeds"),
    case("cli-seed-beyond-int32", "cli", lambda c: c.train("--seeds", "0,3000000000"), 2,
         "--seeds", "2147483647"),
    case("cli-hidden-zero", "cli", lambda c: c.train("--hidden", "0"), 2, "--hidden"),
    case("cli-devices-zero", "cli", lambda c: c.train("--devices", "0"), 2, "--devices"),
    case("cli-devices-too-many", "cli", lambda c: c.train("--devices", "64"), 2, "--devices",
         "64"),
    case("cli-keep-checkpoints-zero", "cli", lambda c: c.train("--keep-checkpoints", "0"), 2,
         "--keep-checkpoints"),
    case("cli-checkpoint-every-negative", "cli",
         lambda c: c.train("--checkpoint-every", "-1"), 2, "--checkpoint-every"),
    case("cli-unknown-flag", "cli", lambda c: c.train("--epochz", "3"), 2, "--epochz"),
    case("cli-no-command", "cli", lambda c: [], 2, "command"),
    case("cli-out-is-a-file", "cli", lambda c: c.train(out=c.image("taken", b"data")), 2,
         "--out", "taken", "file"),
    case("cli-out-inside-a-file", "cli",
         lambda c: c.train(out=c.image("plain", b"data") / "run"), 2, "--out", "plain"),
    case("cli-out-not-writable", "cli", lambda c: c.train(out="/proc/mnist-jax-run"), 2,
         "--out", "/proc/mnist-jax-run"),
    case("cli-resume-and-overwrite", "cli",
         lambda c: c.train("--resume", "--overwrite", out=c.run_copy()), 2,
         "--resume", "--overwrite"),
    case("cli-predict-batch-size-zero", "cli",
         lambda c: ["predict", c.run, "--batch-size", "0"], 2, "--batch-size"),
    case("cli-predict-show-negative", "cli",
         lambda c: ["predict", c.run, "--show", "-1"], 2, "--show"),
    # ---- run folders ------------------------------------------------------------------------
    case("run-missing", "run", lambda c: ["evaluate", c.tmp / "no_such_run"], 2,
         "no_such_run"),
    case("run-is-a-file", "run", lambda c: ["predict", c.image("run.txt", b"x")], 2,
         "run.txt"),
    case("run-without-config", "run",
         lambda c: ["evaluate", without(c.run_copy(), "config.json")], 2, "config.json"),
    case("run-config-not-json", "run",
         lambda c: ["predict", damaged(c.run_copy(), "config.json", b"{oops")], 1,
         "config.json"),
    case("run-config-not-an-object", "run",
         lambda c: ["predict", damaged(c.run_copy(), "config.json", b"[1, 2]")], 1,
         "config.json"),
    case("run-config-invalid-values", "run",
         lambda c: ["evaluate", edit_config(c.run_copy(), epochs=-4)], 1, "config.json",
         "--epochs"),
    case("run-config-says-cnn-params-are-mlp", "run",
         lambda c: ["predict", edit_config(c.run_copy(), model="cnn")], 1,
         "params.msgpack", "don't match"),
    case("run-params-damaged", "run",
         lambda c: ["evaluate", damaged(c.run_copy(), "params.msgpack", lambda b: b[:1000])], 1,
         "params.msgpack", "damaged"),
    case("run-params-garbage", "run",
         lambda c: ["predict", damaged(c.run_copy(), "params.msgpack", os.urandom(5000))], 1,
         "params.msgpack"),
    case("run-params-empty", "run",
         lambda c: ["report", damaged(c.run_copy(), "params.msgpack", b"")], 1,
         "params.msgpack"),
    case("run-no-params-yet", "run",
         lambda c: ["predict", without(c.run_copy(), "params.msgpack")], 2,
         "params.msgpack", "--resume"),
    case("run-data-folder-gone", "run",
         lambda c: ["evaluate", edit_config(c.run_copy(), data_dir=str(c.tmp / "moved"))], 1,
         "moved"),
    case("run-report-out-is-a-file", "run",
         lambda c: ["report", c.run, "--out", c.image("figs", b"x")], 2, "figs"),
    # ---- training into existing runs ------------------------------------------------------
    case("train-into-existing-run-refused", "train", lambda c: c.train(out=c.run_copy()), 2,
         "already holds a run", "--resume", "--overwrite"),
    case("train-resume-with-other-flags", "train",
         lambda c: c.train("--resume", "--lr", "0.5", out=c.run_copy()), 2,
         "--resume", "learning_rates"),
    case("train-resume-damaged-checkpoints", "train",
         lambda c: c.train("--resume", "--epochs", "3",
                           out=damage_checkpoints(c.run_copy())), 1, "checkpoint",
         warnings_ok=True),  # one "falling back" warning per damaged checkpoint, then the error
]


def _gz_truncated(folder: Path) -> Path:
    raw = (folder / T).read_bytes()
    (folder / T).unlink()
    (folder / (T + ".gz")).write_bytes(gzip.compress(raw)[:-300])
    return folder


def _dir_for_file(folder: Path, stem: str) -> Path:
    (folder / stem).unlink()
    (folder / stem).mkdir()
    return folder


IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "duplicate case ids"


def test_case_table_is_counted():
    by_group: dict[str, int] = {}
    for c in CASES:
        by_group[c.group] = by_group.get(c.group, 0) + 1
    valid = sum(c.code == 0 for c in CASES)
    print(f"\n{len(CASES)} bad-input cases ({len(CASES) - valid} must fail cleanly, {valid} are "
          f"valid and must work): " + ", ".join(f"{g} {n}" for g, n in by_group.items()))
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(case: Case, world, tmp_path, capfd, monkeypatch):
    ctx = Ctx(tmp_path, world)
    monkeypatch.setenv("MNIST_JAX_CACHE_DIR", str(tmp_path / "cache"))
    if case.id == "data-no-folder-and-no-network":
        monkeypatch.delenv("MNIST_JAX_DATA_DIR", raising=False)
        monkeypatch.setenv("MNIST_JAX_MNIST_URL", "http://127.0.0.1:9/")  # nothing listens
    argv = case.argv(ctx)
    if case.deny_read:
        _deny_reading(monkeypatch, case.deny_read)
    fresh_out = ctx.tmp / "new_run"
    before = {p: tree_digest(p) for p in ctx.guarded}

    code, out, err = run_cli(argv, capfd)

    assert "Traceback" not in err + out
    after = {p: tree_digest(p) for p in ctx.guarded}
    for p in ctx.guarded:
        assert after[p] == before[p], f"{p} changed: {set(before[p]) ^ set(after[p])}"
    if case.code == 0:
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        record = json.loads(lines[0])
        assert record["class"] in range(10) and len(record["top3"]) == 3
        assert err.strip() == "", err
        return
    lines = err.strip().splitlines()
    if case.warnings_ok:
        lines = [line for line in lines if not line.startswith("mnist-jax: warning: ")]
    assert code == case.code, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert lines[0].startswith("mnist-jax"), lines[0]
    for name in case.names:
        assert name.lower() in lines[0].lower(), f"{name!r} not named in: {lines[0]}"
    if case.group in ("data", "cli") and fresh_out.exists():  # a fresh folder: not a run
        assert not (fresh_out / "config.json").exists(), list(fresh_out.iterdir())


def _deny_reading(monkeypatch, fragment: str) -> None:
    """As root every file is readable: simulate a file without read permission."""
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if fragment in str(file) and "r" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


# ---------------------------------------------------------------------------------------
# a few as real subprocesses: only the one line reaches the terminal
# ---------------------------------------------------------------------------------------
SUBPROCESS_CASES = ["image-not-an-image", "cli-lr-nan", "run-config-says-cnn-params-are-mlp",
                    "data-label-out-of-range", "train-resume-damaged-checkpoints"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_subprocess(case_id, world, tmp_path):
    c = next(c for c in CASES if c.id == case_id)
    ctx = Ctx(tmp_path, world)
    argv = [str(a) for a in c.argv(ctx)]
    before = {p: tree_digest(p) for p in ctx.guarded}
    env = dict(os.environ, MNIST_JAX_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "mnist_jax.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == c.code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines()
             if not (c.warnings_ok and line.startswith("mnist-jax: warning: "))]
    assert len(lines) == 1 and lines[0].startswith("mnist-jax: error: "), proc.stderr
    assert {p: tree_digest(p) for p in ctx.guarded} == before


# ---------------------------------------------------------------------------------------
# the bad-data cases again, on a machine where MNIST was prepared before (issue #11): a warm
# tfds store and a warm cache must not stand in for the folder given
# ---------------------------------------------------------------------------------------
WARM_CASES = [c for c in CASES if c.group == "data" and c.code == 1
              and c.id.startswith("data-") and c.id != "data-no-folder-and-no-network"]


@pytest.fixture(scope="session")
def warm_cache(mnist, data_cache_dir, world) -> Path:
    """A cache holding tfds' prepared official MNIST and the world's data, both loaded."""
    assert mnist.source == "tfds" and (data_cache_dir / "tfds" / "mnist").is_dir()
    load_dataset("mnist", world["data"], cache_dir=data_cache_dir)
    return data_cache_dir


@pytest.mark.realdata
@pytest.mark.parametrize("case", WARM_CASES, ids=[c.id for c in WARM_CASES])
def test_bad_data_with_a_warm_tfds_store_and_cache(case, world, warm_cache, tmp_path, capfd,
                                                  monkeypatch):
    # Hard links: the warm cache, private to this case (writes replace files, never edit).
    shutil.copytree(warm_cache, tmp_path / "cache", copy_function=os.link)
    assert list((tmp_path / "cache" / "tfds" / "mnist").iterdir())
    test_bad_input(case, world, tmp_path, capfd, monkeypatch)
