"""The pure training core: steps, compiled epochs, determinism, exact resume, vmap, NaN."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import data as data_lib
from mnist_jax.config import TrainConfig
from mnist_jax.models import MLP
from mnist_jax.run import (StateInit, TrainingDiverged, build_model, build_optimizer,
                           check_training_fits, epoch_compile_options, fit, init_state)
from mnist_jax.training import (CPU_LOOP_EMITTERS, CURVE_POINTS, compile_fns, create_train_state,
                                epoch_permutation, eval_metrics, injected_hyperparams,
                                make_optimizer, predict_probs,
                                stack_states, train_epoch, train_step, unstack_state)


def synthetic(n: int = 512, seed: int = 0) -> data_lib.Dataset:
    """Learnable toy digits: class k lights up row block k."""
    images, labels = data_lib.synthetic_digits(np.random.default_rng(seed), n)
    labels = labels.astype(np.int32)
    return data_lib.Dataset("synthetic", images[: n - 128], labels[: n - 128], images[n - 128:],
                            labels[n - 128:], source="test")


SMALL = TrainConfig(epochs=3, batch_size=32, hidden=(64,), checkpoint_every=0)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_is_pure_and_lowers_the_loss():
    ds = synthetic()
    state = create_train_state(MLP(hidden=(64,)), make_optimizer(), seed=0)
    x, y = jnp.asarray(ds.train_images[:64]), jnp.asarray(ds.train_labels[:64])
    step = jax.jit(train_step)
    s1, m1 = step(state, x, y)
    s1b, m1b = step(state, x, y)
    assert leaves_equal(s1, s1b) and float(m1["loss"]) == float(m1b["loss"])
    assert int(state.step) == 0 and int(s1.step) == 1  # the input state is untouched
    s = s1
    for _ in range(20):
        s, m = step(s, x, y)
    assert float(m["loss"]) < 0.5 * float(m1["loss"])


def test_epoch_visits_each_example_at_most_once_and_reshuffles():
    state = create_train_state(MLP(hidden=(8,)), make_optimizer(), seed=0)
    perm = np.asarray(epoch_permutation(state, 100, 32))
    assert perm.shape == (3, 32) and len(set(perm.ravel())) == 96
    later = state.replace(step=state.step + 3)  # one epoch later
    assert not np.array_equal(perm, np.asarray(epoch_permutation(later, 100, 32)))


def test_an_epoch_reports_its_steps_as_a_curve_of_ten_consecutive_stretches():
    """metrics.jsonl's ``train_loss_curve``: the epoch's step losses, averaged over
    consecutive stretches of nearly equal length (12 steps: 10 stretches of 1 or 2 steps),
    so a one-epoch run has a learning curve too."""
    ds = synthetic(532)  # 404 training digits: 12 batches of 32, 20 left over
    state = create_train_state(MLP(hidden=(8,)), make_optimizer(), seed=0)
    x, y = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
    _, m = jax.jit(train_epoch, static_argnums=3)(state, x, y, 32)
    step, s, losses, accs = jax.jit(train_step), state, [], []
    for idx in np.asarray(epoch_permutation(state, len(y), 32)):
        s, one = step(s, x[idx], y[idx])
        losses.append(float(one["loss"]))
        accs.append(float(one["accuracy"]))
    assert CURVE_POINTS == 10 and len(losses) == 12
    bounds = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]
    for curve, per_step in ((m.loss_curve, losses), (m.accuracy_curve, accs)):
        want = [np.mean(per_step[a:b]) for a, b in zip(bounds, bounds[1:])]
        np.testing.assert_allclose(np.asarray(curve), want, rtol=1e-5)
    np.testing.assert_allclose(float(m.loss), np.mean(losses), rtol=1e-5)
    _, short = jax.jit(train_epoch, static_argnums=3)(state, x[:96], y[:96], 32)
    assert np.asarray(short.loss_curve).shape == (3,)  # fewer steps than points: one per step


def test_same_seed_gives_bitwise_identical_runs():
    ds = synthetic()
    a, b = fit(SMALL, ds), fit(SMALL, ds)
    assert leaves_equal(a.state.params, b.state.params)
    assert a.history == [dict(r, epoch_seconds=r2["epoch_seconds"]) for r, r2 in
                         zip(b.history, a.history)]
    c = fit(dataclasses.replace(SMALL, seeds=(1,)), ds)
    assert not leaves_equal(a.state.params, c.state.params)


def test_with_a_validation_split_the_test_set_is_read_once_after_the_last_epoch():
    ds = synthetic()
    result = fit(dataclasses.replace(SMALL, validation_split=0.25), ds)
    rows = result.history
    assert all("val_accuracy" in r and "val_loss" in r for r in rows)
    assert [("test_accuracy" in r, "test_loss" in r) for r in rows] == [(False, False)] * 2 + [
        (True, True)]
    assert result.test["accuracy"] == rows[-1]["test_accuracy"]
    # without one, the test set is the validation data of every epoch (the Keras tutorial)
    assert all("test_accuracy" in r and "val_accuracy" not in r for r in fit(SMALL, ds).history)


def test_resuming_from_a_state_continues_exactly():
    ds = synthetic()
    full = fit(SMALL, ds)
    part = fit(dataclasses.replace(SMALL, epochs=2), ds)
    resumed = fit(SMALL, ds, state=part.state, history=part.history)
    assert leaves_equal(full.state, resumed.state)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_cosine_schedule_ends_the_run_at_a_zero_learning_rate_and_resumes_exactly():
    ds = synthetic()  # 384 training images: 12 steps of 32 per epoch, 36 in the run
    cosine = dataclasses.replace(SMALL, lr_schedule="cosine")
    assert cosine.total_steps(len(ds.train_labels)) == 36
    full = fit(cosine, ds)
    assert int(full.state.opt_state[1].count) == 36
    # the schedule has reached 0: one more step leaves the parameters as they are
    x, y = jnp.asarray(ds.train_images[:32]), jnp.asarray(ds.train_labels[:32])
    after, _ = jax.jit(train_step)(full.state, x, y)
    assert leaves_equal(after.params, full.state.params)
    assert not leaves_equal(full.state.params, fit(SMALL, ds).state.params)

    class Stop(Exception):
        pass

    saved = {}

    def stop_after_2(epoch, state, row):
        if epoch == 2:
            saved.update(state=state, history=[row])
            raise Stop

    with pytest.raises(Stop):
        fit(cosine, ds, on_epoch=stop_after_2)
    resumed = fit(cosine, ds, state=saved["state"], history=saved["history"])
    assert leaves_equal(full.state, resumed.state)


def test_vmapped_seeds_match_separate_runs():
    ds = synthetic()
    many = fit(dataclasses.replace(SMALL, seeds=(0, 1)), ds)
    for i, seed in enumerate((0, 1)):
        one = fit(dataclasses.replace(SMALL, seeds=(seed,)), ds)
        for x, y in zip(jax.tree.leaves(unstack_state(many.state, i).params),
                        jax.tree.leaves(one.state.params)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert len(many.history[-1]["test_accuracy"]) == 2


def test_learning_rate_sweep_gives_each_model_its_rate():
    ds = synthetic()
    model, tx = MLP(hidden=(16,)), make_optimizer()
    states = stack_states([create_train_state(model, tx, 0, lr) for lr in (1e-3, 0.0)])
    fns = compile_fns(32, 2)
    new, _ = fns.train_epoch(states, jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
    moved = [not leaves_equal(unstack_state(new, i).params, unstack_state(states, i).params)
             for i in range(2)]
    assert moved == [True, False]


class _NaNAfterStart(nn.Module):
    """A model whose output is NaN: the loss is non-finite at the first step."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        w = self.param("w", nn.initializers.zeros, (784, 10))
        return x.reshape(x.shape[0], -1) @ w + jnp.nan


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_state(monkeypatch):
    import mnist_jax.run as run_mod
    monkeypatch.setattr(run_mod, "build_model", lambda config: _NaNAfterStart())
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 0") as e:
        fit(SMALL, synthetic())
    assert int(e.value.state.step) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(e.value.state.params))


def test_eval_metrics_counts_every_example_with_padding():
    ds = synthetic()
    state = create_train_state(MLP(hidden=(16,)), make_optimizer(), 0)
    x, y = jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels)
    full = jax.jit(eval_metrics, static_argnums=3)(state, x, y, 128)
    odd = jax.jit(eval_metrics, static_argnums=3)(state, x, y, 50)  # 128 = 2·50 + 28 padded
    np.testing.assert_allclose(full["loss"], odd["loss"], rtol=1e-5)
    assert float(full["accuracy"]) == float(odd["accuracy"])


@pytest.mark.realdata
def test_one_epoch_of_the_tutorial_mlp_reaches_95_percent(mnist):
    result = fit(TrainConfig(epochs=1, checkpoint_every=0), mnist)
    print("MLP 1 epoch test accuracy", result.test["accuracy"])
    assert result.test["accuracy"] >= 0.95


@pytest.mark.realdata
def test_the_cnn_learns_on_a_real_subset(mnist):
    subset = dataclasses.replace(mnist, train_images=mnist.train_images[:3000],
                                 train_labels=mnist.train_labels[:3000],
                                 test_images=mnist.test_images[:2000],
                                 test_labels=mnist.test_labels[:2000])
    result = fit(TrainConfig(model="cnn", epochs=2, checkpoint_every=0), subset)
    print("CNN on 3000 images, 2 epochs, test accuracy", result.test["accuracy"])
    assert result.test["accuracy"] >= 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("recipe", ["tutorial", "speedrun", "best"])
def test_init_state_is_bitwise_the_state_xla_compiles_with_its_default_settings(recipe):
    """init_state compiles its one-off program at a lower LLVM optimization and with the
    loop emitters on the CPU (its random draws compile seconds faster): the states must be
    the same bits as with XLA's defaults (-O3, fusion emitters)."""
    config = TrainConfig.from_recipe(recipe, seeds=(0, 3))
    model, tx = build_model(config), build_optimizer(config, data_lib.TRAIN_EXAMPLES)
    default = jax.jit(lambda seed: create_train_state(model, tx, seed))
    want = stack_states([default(np.int32(seed)) for seed in config.seeds])
    assert leaves_equal(init_state(config, model=model, optimizer=tx), want)


@pytest.mark.parametrize("recipe", ["tutorial", "keras-cnn", "speedrun", "best"])
def test_evaluation_and_prediction_compiled_with_loop_emitters_are_bitwise_xlas_defaults(recipe):
    """The run's evaluation and prediction programs compile with XLA:CPU's loop emitters
    (faster to compile): they must give the same bits as with its default emitters."""
    state = init_state(TrainConfig.from_recipe(recipe))
    ds = synthetic(256)
    x, y = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
    fns = compile_fns(128, 1)
    assert leaves_equal(fns.evaluate(state, x, y), jax.jit(eval_metrics)(state, x, y))
    assert np.array_equal(fns.predict(state, x), jax.jit(predict_probs)(state, x))


@pytest.mark.parametrize("recipe, loop", [("tutorial", False), ("keras-cnn", False),
                                          ("speedrun", True), ("best", False)])
def test_only_the_channel_major_conv_stack_trains_with_loop_emitters(recipe, loop):
    """The loop emitters run the MLP's epoch 48% slower and give bncnn's other bits: only
    the speedrun's channel-major conv stack, which they run faster, trains with them."""
    options = epoch_compile_options(init_state(TrainConfig.from_recipe(recipe)))
    assert options == (tuple(CPU_LOOP_EMITTERS.items()) if loop else ())


def test_the_speedrun_epoch_compiled_with_loop_emitters_is_bitwise_xlas_default():
    config = TrainConfig.from_recipe("speedrun")
    state = init_state(config)
    ds = synthetic(4 * config.batch_size + 128)
    x, y = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
    loop = compile_fns(config.batch_size, 1,
                       epoch_options=tuple(CPU_LOOP_EMITTERS.items())).train_epoch
    default = compile_fns(config.batch_size, 1).train_epoch
    programs = [fn.lower(state, x, y).compile().as_text() for fn in (loop, default)]
    assert programs[0] != programs[1]  # the option took effect
    assert leaves_equal(loop(state, x, y), default(state, x, y))


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_fit_runs_the_epoch_compiled_from_the_state_shapes(seeds):
    """A training run compiles its epoch from StateInit.shapes() while the arrays are made
    (check_training_fits, in a thread): the shapes are the arrays', and fit with those
    arrays does not compile the epoch a second time."""
    config = dataclasses.replace(SMALL, epochs=1, seeds=seeds, hidden=(24,))
    ds = synthetic()
    init = StateInit(config, len(ds.train_labels))
    shapes = init.shapes()
    check_training_fits(config, ds, shapes)
    state = init()
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
            == jax.tree.map(lambda a: (a.shape, a.dtype), state))
    compiled = []
    def listener(event, seconds, fun_name=""):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fit(config, ds, state=state)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "jit(eval_metrics)" in compiled  # what is compiled is seen
    assert not [name for name in compiled if "train_epoch" in name]


def test_init_state_stacks_one_state_per_seed_and_rate():
    state = init_state(TrainConfig(seeds=(0, 1, 2), learning_rates=(1e-3, 1e-4), hidden=(8,)))
    assert state.step.shape == (6,)
    lrs = np.asarray(injected_hyperparams(state.opt_state)["learning_rate"])
    np.testing.assert_allclose(lrs, [1e-3, 1e-4] * 3, rtol=1e-6)
