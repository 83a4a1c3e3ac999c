"""Specifications for mnist_jax.checkpoint: round trips, rotation, damage, crashes, full disks."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

import mnist_jax.checkpoint as ckpt
from mnist_jax.checkpoint import Checkpointer, load_params, save_params
from mnist_jax.errors import DataError, UsageError

TMP_MARK = ".orbax-checkpoint-tmp"

# When one array read/write fails, orbax closes its event loop while tensorstore
# still finishes the others, which then print "Exception ignored in: None ...
# Event loop is closed" or "Exception ignored in: <coroutine ...>". Harmless.
ORBAX_ABANDONED_IO = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning",
    "ignore:Exception ignored in. <coroutine:pytest.PytestUnraisableExceptionWarning",
)


class MLP(nn.Module):
    """The tutorial's 784-784-10 MLP."""

    hidden: int = 784

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_state(seed: jax.Array | int) -> TrainState:
    """A state after one Adam step, so that mu/nu/count are all non-trivial."""
    params = MLP().init(jax.random.PRNGKey(seed), jnp.zeros((1, 784)))["params"]
    tx = optax.inject_hyperparams(optax.adam)(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(seed + 7), p.shape, p.dtype), params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.asarray(1, jnp.int32),
        params=optax.apply_updates(params, updates),
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed + 100),
    )


@pytest.fixture(scope="module")
def states() -> dict[int, TrainState]:
    """Three distinct realistic states, keyed by the epoch they are saved as."""
    return {e: make_state(e) for e in (1, 2, 3)}


def assert_same(restored: Any, expected: Any) -> None:
    """Same pytree structure (node types included), dtypes and bits."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def restore_quiet(c: Checkpointer, template: Any, epoch: int | None = None
                  ) -> tuple[tuple[int, Any, dict] | None, list[str]]:
    """restore() plus the warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = c.restore(template, epoch)
    return result, [str(w.message) for w in caught]


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("epoch_"))


# -- round trip -----------------------------------------------------------------
@pytest.mark.parametrize("models", [None, 3])
def test_round_trip_is_bitwise_and_keeps_types(tmp_path: Path, models: int | None) -> None:
    state = make_state(5) if models is None else jax.vmap(make_state)(jnp.arange(models))
    meta = {"epoch": 4, "rows": [{"epoch": 1, "loss": np.float32(0.25), "acc": 0.9}],
            "config": {"model": "mlp", "lr": 1e-3}}
    with Checkpointer(tmp_path) as c:
        c.save(4, state, meta)
    template = make_state(0) if models is None else jax.vmap(make_state)(jnp.zeros(models, int))
    with Checkpointer(tmp_path) as c:
        assert c.latest() == 4 and c.all_epochs() == [4]
        result, warned = restore_quiet(c, template)
    assert not warned
    epoch, restored, restored_meta = result
    assert epoch == 4
    assert_same(restored, state)
    assert type(restored) is TrainState
    assert type(restored.opt_state) is type(state.opt_state)
    assert type(restored.opt_state.inner_state[0]) is optax.ScaleByAdamState
    assert isinstance(restored.params["Dense_0"]["kernel"], jax.Array)
    assert restored.rng.dtype == jnp.uint32 and restored.rng.shape == state.rng.shape
    if models:
        assert restored.params["Dense_0"]["kernel"].shape == (models, 784, 784)
    assert restored_meta == {"epoch": 4, "rows": [{"epoch": 1, "loss": 0.25, "acc": 0.9}],
                             "config": {"model": "mlp", "lr": 1e-3}}


def test_files_are_json_and_array_stores_not_pickle(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, states[1], {"epoch": 1})
    for f in (tmp_path / "epoch_1").rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"


def test_empty_directory_restores_none(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path / "new") as c:
        assert c.latest() is None and c.all_epochs() == []
        assert c.restore(states[1]) is None


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(UsageError):
        Checkpointer(tmp_path, every=0)


# -- rotation -------------------------------------------------------------------
def test_keep_two_keeps_only_the_two_newest(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path, keep=2) as c:
        for epoch in range(1, 6):
            c.save(epoch, states[1 + epoch % 3], {"epoch": epoch})
        assert c.all_epochs() == [4, 5]
    assert step_dirs(tmp_path) == ["epoch_4", "epoch_5"]


def test_every_two_skips_odd_epochs_unless_forced(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path, keep=5, every=2) as c:
        for epoch in range(1, 6):
            c.save(epoch, states[1], {"epoch": epoch})
        assert c.all_epochs() == [2, 4]
        c.save(5, states[1], {"epoch": 5}, force=True)
        assert c.all_epochs() == [2, 4, 5]


def test_saving_an_epoch_again_keeps_the_good_copy(tmp_path: Path, states: dict) -> None:
    """A forced save on Ctrl-C of the epoch just saved never deletes it to rewrite it."""
    with Checkpointer(tmp_path, keep=1) as c:
        c.save(1, states[1], {"epoch": 1})
        before = (tmp_path / "epoch_1" / "meta" / "metadata").stat().st_ino
        c.save(1, states[1], {"epoch": 1}, force=True)
        assert (tmp_path / "epoch_1" / "meta" / "metadata").stat().st_ino == before
    with Checkpointer(tmp_path, keep=1) as c:
        result, _ = restore_quiet(c, states[2])
        c.save(1, states[1], {"epoch": 1}, force=True)  # restored: known good too
        assert (tmp_path / "epoch_1" / "meta" / "metadata").stat().st_ino == before
        assert result[0] == 1 and c.all_epochs() == [1]


# -- damage -------------------------------------------------------------------
def _largest_array_file(step: Path) -> Path:
    files = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step: Path) -> None:
    f = _largest_array_file(step)
    os.truncate(f, f.stat().st_size // 2)


def _delete(step: Path) -> None:
    _largest_array_file(step).unlink()


def _flip_bits(step: Path) -> None:
    f = _largest_array_file(step)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _bad_json(step: Path) -> None:
    (step / "meta" / "metadata").write_text('{"meta": {"epoch": 2,')


def _no_meta(step: Path) -> None:
    (step / "meta" / "metadata").unlink()


@ORBAX_ABANDONED_IO
@pytest.mark.parametrize("damage", [_truncate, _delete, _flip_bits, _bad_json, _no_meta])
def test_damaged_newest_falls_back_with_warning(tmp_path: Path, states: dict, damage) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, states[1], {"epoch": 1})
        c.save(2, states[2], {"epoch": 2})
    damage(tmp_path / "epoch_2")
    with Checkpointer(tmp_path) as c:
        result, warned = restore_quiet(c, states[3])
        assert result is not None and result[0] == 1 and result[2] == {"epoch": 1}
        assert_same(result[1], states[1])
        assert len(warned) == 1 and "epoch_2" in warned[0] and "\n" not in warned[0]
        # Resuming from epoch 1 re-saves epoch 2 over the damaged one.
        c.save(2, states[3], {"epoch": 2})
        result, warned = restore_quiet(c, states[1])
        assert not warned and result[0] == 2
        assert_same(result[1], states[3])


def test_damaged_meta_is_not_latest(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, states[1], {"epoch": 1})
        c.save(2, states[2], {"epoch": 2})
        _bad_json(tmp_path / "epoch_2")
        assert c.latest() == 1


@ORBAX_ABANDONED_IO
def test_all_damaged_is_a_data_error(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, states[1], {"epoch": 1})
    _truncate(tmp_path / "epoch_1")
    with Checkpointer(tmp_path) as c, pytest.raises(DataError, match="epoch_1"):
        c.restore(states[1])


@ORBAX_ABANDONED_IO
def test_a_named_epoch_restores_that_checkpoint_or_says_why_not(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path, keep=3) as c:
        for epoch in (1, 2, 3):
            c.save(epoch, states[epoch], {"epoch": epoch})
    _truncate(tmp_path / "epoch_2")
    with Checkpointer(tmp_path) as c:
        result, warned = restore_quiet(c, states[3], epoch=1)
        assert not warned and result[0] == 1 and result[2] == {"epoch": 1}
        assert_same(result[1], states[1])
        with pytest.raises(DataError, match=r"epoch_2 is unusable"):  # no fallback to epoch 1
            c.restore(states[3], epoch=2)
        with pytest.raises(DataError, match=r"no checkpoint of epoch 7 .*\(kept: 1, 2, 3\)"):
            c.restore(states[3], epoch=7)


def test_leftover_temporary_dir_is_ignored_and_cleaned(tmp_path: Path, states: dict) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, states[1], {"epoch": 1})
    # What a save killed before its commit leaves behind (half of a step dir).
    tmp = tmp_path / f"epoch_2{TMP_MARK}"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text('{"tree_metadata": {')
    with Checkpointer(tmp_path) as c:
        assert c.all_epochs() == [1] and c.latest() == 1
        result, warned = restore_quiet(c, states[3])
        assert not warned and result[0] == 1
        assert tmp.exists()  # a reader never deletes it (it may be a live save's)
        c.save(2, states[2], {"epoch": 2})
    assert not tmp.exists() and step_dirs(tmp_path) == ["epoch_1", "epoch_2"]


# -- crashes ------------------------------------------------------------------
_N_FLOATS = 12_500_000  # 50 MB of float32 per state

_CHILD = """
import sys, time
import numpy as np
from mnist_jax.checkpoint import Checkpointer
def state(e):
    w = np.random.default_rng(e).standard_normal({n}, dtype=np.float32)
    return {{"w": w, "step": np.asarray(e, np.int32)}}
s1, s2 = state(1), state(2)
with Checkpointer(sys.argv[1], keep=1) as c:
    c.save(1, s1, {{"epoch": 1}})
    print("saving", flush=True)
    t = time.monotonic()
    c.save(2, s2, {{"epoch": 2}})
    print("saved", time.monotonic() - t, flush=True)
""".format(n=_N_FLOATS)


def _child_state(epoch: int) -> dict[str, np.ndarray]:
    w = np.random.default_rng(epoch).standard_normal(_N_FLOATS, dtype=np.float32)
    return {"w": w, "step": np.asarray(epoch, np.int32)}


def _run_child(directory: Path, kill_after: float | None) -> float | None:
    """Run the saving child; SIGKILL it ``kill_after`` s after it starts saving epoch 2.

    With ``kill_after=None`` it is killed as soon as save() has returned; the
    duration of that save is returned.
    """
    package_root = Path(ckpt.__file__).parent.parent  # not resolved: run the same copy
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
        duration = None
        if kill_after is None:
            line = child.stdout.readline().split()
            assert line[0] == "saved"
            duration = float(line[1])
        else:
            time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        return duration
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    # Killed right after save() returned: the checkpoint must be there. This run
    # also times the save, to scale the other kill points to this machine.
    duration = _run_child(tmp_path / "full", None)
    fractions = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    expected = {1: _child_state(1), 2: _child_state(2)}
    template = {"w": np.zeros(_N_FLOATS, np.float32), "step": np.asarray(0, np.int32)}
    outcomes = {}
    for i, fraction in enumerate([None, *fractions]):
        directory = tmp_path / ("full" if fraction is None else f"kill{i}")
        if fraction is not None:
            _run_child(directory, fraction * duration)
        with Checkpointer(directory, keep=1) as c:
            result, warned = restore_quiet(c, template)
            assert result is not None, f"nothing restorable after a kill at {fraction}"
            epoch, state, meta = result
            assert epoch in (1, 2) and meta == {"epoch": epoch}
            assert not warned, warned  # a killed save is never seen as a (damaged) checkpoint
            assert_same(state, expected[epoch])
            left_tmp = any(TMP_MARK in p.name for p in directory.iterdir())
            outcomes[fraction] = (epoch, bool(warned), left_tmp)
            c.save(3, {"x": np.ones(3, np.float32)}, {"epoch": 3})  # resuming works
            assert c.all_epochs() == [3]
        assert step_dirs(directory) == ["epoch_3"], outcomes
        assert not any(TMP_MARK in p.name for p in directory.iterdir())
    print("kill fraction of save time -> (epoch, warned, tmp dir left):", outcomes)
    assert outcomes[None][0] == 2, outcomes


# -- full disk -------------------------------------------------------------------
@ORBAX_ABANDONED_IO
def test_disk_full_writing_json_keeps_previous(tmp_path: Path, states: dict, monkeypatch) -> None:
    """ENOSPC on orbax's Python-side writes (JSON metadata, commit marker)."""
    with Checkpointer(tmp_path, keep=1) as c:
        c.save(1, states[1], {"epoch": 1})
        path_cls = type(epath.Path(tmp_path))
        real_write_text = path_cls.write_text

        def full_disk(self, *args, **kwargs):
            if "epoch_2" in os.fspath(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(path_cls, "write_text", full_disk)
        with pytest.raises(OSError) as info:
            c.save(2, states[2], {"epoch": 2})
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert c.all_epochs() == [1]
        assert step_dirs(tmp_path) == ["epoch_1"]
        assert not any(TMP_MARK in p.name for p in tmp_path.iterdir())  # space freed
        result, warned = restore_quiet(c, states[3])
        assert not warned and result[0] == 1
        assert_same(result[1], states[1])
        c.save(2, states[2], {"epoch": 2})  # space is back: saving works again
        assert c.all_epochs() == [2]


@ORBAX_ABANDONED_IO
def test_failed_array_write_keeps_previous(tmp_path: Path, states: dict) -> None:
    """A real write failure inside tensorstore (file-size limit: EFBIG) surfaces as OSError."""
    with Checkpointer(tmp_path, keep=1) as c:
        c.save(1, states[1], {"epoch": 1})
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))
        try:
            with pytest.raises(OSError) as info:
                c.save(2, states[2], {"epoch": 2})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
        assert info.value.errno == errno.EFBIG and "epoch_2" in str(info.value)
        assert c.all_epochs() == [1] and step_dirs(tmp_path) == ["epoch_1"]
        result, _ = restore_quiet(c, states[3])
        assert result[0] == 1
        assert_same(result[1], states[1])


# -- final parameters -------------------------------------------------------------
def test_params_round_trip(tmp_path: Path, states: dict) -> None:
    path = tmp_path / "out" / "params.msgpack"
    save_params(path, states[1].params)
    save_params(path, states[2].params)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["params.msgpack"]
    assert_same(load_params(path, template=states[3].params), states[2].params)
    plain = load_params(path)
    assert np.array_equal(plain["Dense_1"]["bias"], states[2].params["Dense_1"]["bias"])


def test_load_params_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        load_params(tmp_path / "nope.msgpack")
    assert "nope.msgpack" in str(info.value)


@pytest.mark.parametrize("payload", [b"\x00garbage\xff\xfe" * 10, b"", b"\x92\x01\x02"])
def test_load_params_garbage(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "params.msgpack"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="params.msgpack") as info:
        load_params(path)
    assert "\n" not in str(info.value)


def test_load_params_truncated(tmp_path: Path, states: dict) -> None:
    path = tmp_path / "params.msgpack"
    save_params(path, states[1].params)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match="damaged"):
        load_params(path)


def test_load_params_of_another_model(tmp_path: Path, states: dict) -> None:
    path = tmp_path / "params.msgpack"
    save_params(path, states[1].params)
    other = MLP(hidden=256).init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]
    with pytest.raises(DataError, match="don't match the model"):
        load_params(path, template=other)
    with pytest.raises(DataError, match="don't match the model"):
        load_params(path, template={"Dense_0": other["Dense_0"]})
