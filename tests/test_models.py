"""Specification of mnist_jax.models: the tutorial architectures, their options
(dropout, layouts, per-layer kernel sizes, bf16), the presets and their errors.
The fast CNN path's equivalence with XLA is in test_fastconv.py; summary and
FLOP counts in test_summary.py."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_helpers import images, n_params, param_shapes, random_params

from mnist_jax import models
from mnist_jax.augment import center_zoom
from mnist_jax.models import BNCNN, CNN, MLP, MNIST_MEAN_STD, MODEL_NAMES, create_model
from mnist_jax.summary import count_params, summary

# ---------------------------------------------------------------- architecture


def test_param_counts_match_keras() -> None:
    assert n_params(MLP()) == 623_290
    assert n_params(CNN(impl="xla")) == 1_199_882
    assert n_params(CNN(impl="fast")) == 1_199_882
    assert n_params(CNN(pool_after=(True, True))) == 225_034
    init = jax.jit(lambda k, x: MLP().init(k, x, train=False)["params"])
    assert count_params(init(jax.random.key(0), images(1))) == 623_290


def test_mlp_flattens_every_layout_and_returns_float32_logits() -> None:
    x = images(3)
    m = MLP()
    p = random_params(m)
    ref = m.apply({"params": p}, x, train=False)
    chex.assert_shape(ref, (3, 10))
    chex.assert_type(ref, jnp.float32)
    for layout in (x[..., None], x.reshape(3, 784)):
        np.testing.assert_array_equal(m.apply({"params": p}, layout, train=False), ref)
    # dense -> dropout -> activation: the first layer is a 784x784 Dense
    chex.assert_shape([p["dense_0"]["kernel"], p["dense_1"]["kernel"]], [(784, 784), (784, 10)])


@pytest.mark.parametrize("model", [MLP(), CNN(impl="xla", features=(4, 8), dense=(16,)),
                                   CNN(impl="fast", features=(4, 8), dense=(16,))],
                         ids=["mlp", "cnn-xla", "cnn-fast"])
def test_dropout_only_in_train_mode(model: Any) -> None:
    x = images(4)
    p = random_params(model)
    v = {"params": p}
    ev = model.apply(v, x, train=False)
    np.testing.assert_array_equal(ev, model.apply(v, x, train=False))
    tr1 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    tr2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    tr3 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(tr1, tr2)
    assert not np.allclose(tr1, ev) and not np.allclose(tr1, tr3)


def test_zero_dropout_train_equals_eval() -> None:
    m = MLP(dropout=0.0, hidden=(32, 16), activation="tanh")
    x = images(2)
    p = random_params(m)
    np.testing.assert_array_equal(m.apply({"params": p}, x, train=True),
                                  m.apply({"params": p}, x, train=False))


def test_cnn_input_layouts_and_appendix_shapes() -> None:
    x = images(2)
    for impl in ("xla", "fast"):
        m = CNN(impl=impl, pool_after=(True, True))
        p = random_params(m)
        apply = jax.jit(lambda p, x: m.apply({"params": p}, x, train=False))
        out = apply(p, x)
        chex.assert_shape(out, (2, 10))
        chex.assert_type(out, jnp.float32)
        np.testing.assert_array_equal(apply(p, x[..., None]), out)
        # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5: Dense sees 5*5*64
        chex.assert_shape(p["dense_0"]["kernel"], (5 * 5 * 64, 128))
    text = summary(CNN(pool_after=(True, True)))
    for shape in ("(None, 26, 26, 32)", "(None, 13, 13, 32)", "(None, 11, 11, 64)",
                  "(None, 5, 5, 64)", "(None, 1600)"):
        assert shape in text


def test_kernel_size_per_conv_layer() -> None:
    """The record "speedrun" net: Conv5x5->24, pool, ReLU, Conv3x3->32, pool, ReLU,
    Dense 256, ReLU, Dense 10 (ReLU and max-pool commute)."""
    f0, f1, k0, k1, hidden, classes, pool = 24, 32, 5, 3, 256, 10, 2
    kw = {"features": (f0, f1), "kernel_size": (k0, k1), "pool_after": (True, True),
          "dense": (hidden,), "conv_dropout": 0.0, "dense_dropout": 0.0}
    side0 = (28 - k0 + 1) // pool  # VALID conv, then a 2x2 pool
    side1 = (side0 - k1 + 1) // pool
    flat = side1 * side1 * f1
    expected = ((k0 * k0 * 1 * f0 + f0) + (k1 * k1 * f0 * f1 + f1)
                + (flat * hidden + hidden) + (hidden * classes + classes))
    for impl in ("xla", "fast"):
        shapes = param_shapes(CNN(impl=impl, **kw))
        chex.assert_shape([shapes["conv_0"]["kernel"], shapes["conv_1"]["kernel"],
                           shapes["dense_0"]["kernel"]],
                          [(k0, k0, 1, f0), (k1, k1, f0, f1), (flat, hidden)])
        assert count_params(shapes) == expected, impl
    text = summary(CNN(**kw))
    assert f"(None, {side0}, {side0}, {f0})" in text and f"(None, {flat})" in text
    # one int is every layer's size, as before
    assert param_shapes(CNN(features=(4, 8), kernel_size=5))["conv_1"]["kernel"].shape == (5, 5, 4, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        CNN(features=(f0, f1), kernel_size=(k0,))


def test_impl_resolution_and_identical_init() -> None:
    assert CNN().resolved_impl == ("fast" if jax.default_backend() == "cpu" else "xla")
    assert CNN(impl="xla").resolved_impl == "xla"
    # "auto" trains on the fast path but infers with XLA's convolution (faster forward)
    assert CNN().impl_for(train=False) == "xla"
    assert CNN(impl="fast").impl_for(train=False) == "fast"  # an explicit choice holds
    x = images(1, shape=(12, 12))
    for kw in ({"features": (4, 8), "dense": (16,)},
               {"features": (4, 8), "kernel_size": (5, 3), "dense": ()}):
        a, b = (CNN(impl=i, **kw).init(jax.random.key(3), x, train=False)["params"]
                for i in ("xla", "fast"))
        chex.assert_trees_all_equal(a, b)
    shapes = param_shapes(CNN(impl="fast"))
    chex.assert_shape([shapes["conv_1"]["kernel"], shapes["conv_1"]["bias"]],
                      [(3, 3, 32, 64), (64,)])


def test_unsupported_padding_falls_back_to_xla() -> None:
    m = CNN(impl="fast", padding="CIRCULAR", features=(4, 8), dense=(16,))
    assert m.resolved_impl == "xla"
    x = images(2)
    p = random_params(m)
    np.testing.assert_array_equal(m.apply({"params": p}, x, train=False),
                                  m.clone(impl="xla").apply({"params": p}, x, train=False))
    chex.assert_shape(p["dense_0"]["kernel"], (28 * 28 * 8 // 4, 16))  # SAME-sized, pooled once


def test_bfloat16_compute_keeps_float32_params() -> None:
    x = images(2)
    for m in (MLP(dtype=jnp.bfloat16),
              CNN(impl="fast", dtype="bfloat16", features=(4, 8), dense=(16,))):
        shapes = jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
        p = random_params(m)
        out = m.apply({"params": p}, x, train=False)
        chex.assert_type(out, jnp.float32)
        ref = m.clone(dtype=jnp.float32).apply({"params": p}, x, train=False)
        np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------ presets


def test_create_model_names_a_field_whose_value_has_the_wrong_type() -> None:
    for name, field, value, want in [("cnn", "conv_dropout", "low", "float"),
                                     ("bncnn", "features", [32, "64"], "list of int"),
                                     ("cnn", "input_norm", [0.1], "list of 2 float or null"),
                                     ("mlp", "dropout", True, "float")]:
        with pytest.raises(TypeError, match=f"{field} must be (a )?{want}"):
            create_model(name, **{field: value})
    # what JSON and numpy give for the annotated types is accepted
    m = create_model("cnn", features=[np.int64(8), 16], conv_dropout=0, kernel_size=[5, 3])
    assert m.conv_dropout == 0 and m.kernel_size == [5, 3]


def test_presets_refuse_rates_outside_0_1_and_sizes_below_1() -> None:
    for name, field, value in [("mlp", "dropout", 1.5), ("cnn", "conv_dropout", -0.1),
                               ("bncnn", "bn_momentum", 2.0), ("cnn", "features", (8, 0)),
                               ("cnn", "kernel_size", 0), ("bncnn", "dense", 0),
                               ("mlp", "hidden", (0,)), ("cnn", "features", ())]:
        with pytest.raises(ValueError, match=field):
            create_model(name, **{field: value, **({"pool_after": ()} if value == () else {})})


def test_create_model_and_errors() -> None:
    assert isinstance(create_model("mlp"), MLP)
    m = create_model("cnn", pool_after=(True, True), impl="xla")
    assert isinstance(m, CNN) and m.pool_after == (True, True)
    with pytest.raises(ValueError, match="mlp.*cnn"):
        create_model("resnet")
    with pytest.raises(ValueError, match="activation"):
        create_model("mlp", activation="swishy")
    with pytest.raises(ValueError, match="impl"):
        CNN(impl="cuda")
    with pytest.raises(ValueError, match="pool_after"):
        CNN(pool_after=(True,))


def test_every_model_name_is_a_preset_and_every_impl_is_accepted() -> None:
    """The names the CLI and config offer (mnist_jax.names) are exactly what builds."""
    from mnist_jax import names
    assert MODEL_NAMES == names.MODELS
    assert set(models._PRESETS) == set(names.MODELS)
    for name in names.MODELS:
        assert isinstance(create_model(name), (MLP, CNN, BNCNN))
    for impl in names.IMPLS:
        assert CNN(impl=impl).resolved_impl in ("xla", "fast")


def test_convnet_preset_is_keras_io_simple_convnet() -> None:
    # keras.io "Simple MNIST convnet": Conv32 3x3 relu, pool 2, Conv64 3x3 relu, pool 2,
    # Flatten, Dropout 0.5, Dense 10 -- 34,826 parameters.
    m = create_model("convnet")
    assert isinstance(m, CNN) and m.pool_after == (True, True)
    assert (m.conv_dropout, tuple(m.dense)) == (0.5, ())
    text = summary(m)
    assert "(None, 13, 13, 32)" in text and "(None, 5, 5, 64)" in text and "(None, 1600)" in text
    assert "Total params: 34,826" in text
    assert create_model("convnet", impl="xla").impl == "xla"  # overrides still apply


def test_smallcnn_is_the_speedrun_record_net_on_standardised_inputs() -> None:
    # tuomaso/train_mnist_fast: Conv5x5 1->24, pool, Conv3x3 24->32, pool, Dense 800->256, Dense 10.
    m = create_model("smallcnn", impl="xla")
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)), train=False)["params"]
    assert count_params(params) == (5 * 5 * 1 + 1) * 24 + (3 * 3 * 24 + 1) * 32 \
        + (5 * 5 * 32 + 1) * 256 + (256 + 1) * 10
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28)), jnp.float32)
    plain = m.clone(input_norm=None)
    mean, std = MNIST_MEAN_STD
    np.testing.assert_allclose(m.apply({"params": params}, x, train=False),
                               plain.apply({"params": params}, (x - mean) / std, train=False),
                               rtol=1e-6, atol=1e-6)


def test_torch_weight_init_is_pytorchs_uniform_bound_on_both_paths() -> None:
    # PyTorch's Conv2d/Linear default: kernel and bias uniform in +-1/sqrt(fan_in).
    fan_ins = {"conv_0": 5 * 5 * 1, "conv_1": 3 * 3 * 24, "dense_0": 800, "dense_1": 256}
    x = jnp.zeros((1, 28, 28))
    torch_params, lecun_params = ({impl: create_model("smallcnn", impl=impl, weight_init=w)
                                   .init(jax.random.key(1), x, train=True)["params"]
                                   for impl in ("xla", "fast")} for w in ("torch", "lecun"))
    chex.assert_trees_all_equal(torch_params["xla"], torch_params["fast"])
    for name, fan_in in fan_ins.items():
        bound = fan_in ** -0.5
        for leaf in ("kernel", "bias"):
            p = np.asarray(torch_params["xla"][name][leaf])
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.9 * bound, (name, leaf)
        assert not np.any(lecun_params["xla"][name]["bias"])  # Flax's: zero biases
        # a third of LeCun normal's variance
        ratio = (torch_params["xla"][name]["kernel"].var()
                 / lecun_params["xla"][name]["kernel"].var())
        assert 0.25 < ratio < 0.42, (name, ratio)
    with pytest.raises(ValueError, match="weight_init"):
        CNN(weight_init="glorot")


def test_bncnn_fast_and_xla_agree_and_update_the_same_batch_statistics(full_fp32_matmuls) -> None:
    """The BatchNorm CNN's CPU path (one fast conv block per layer) computes what plain
    nn.Conv does, in training (batch statistics, their update) and inference."""
    fast, xla = BNCNN(impl="fast", conv_dropout=0.0, dense_dropout=0.0), BNCNN(impl="xla")
    x = jnp.asarray(np.random.default_rng(1).random((8, 28, 28)), jnp.float32)
    variables = xla.init(jax.random.PRNGKey(0), x, train=False)
    assert set(variables) == {"params", "batch_stats"}
    outs = [m.clone(conv_dropout=0.0, dense_dropout=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"]) for m in (fast, xla)]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(outs[0][1]["batch_stats"]["bn_0"]["mean"], 0.0)
    np.testing.assert_allclose(fast.apply(variables, x, train=False),
                               xla.apply(variables, x, train=False), rtol=1e-4, atol=1e-4)


def test_bncnn_input_zoom_enlarges_every_input_in_training_and_inference() -> None:
    """``input_zoom`` is part of the model: the same zoomed digits in both modes."""
    x = jnp.asarray(np.random.default_rng(2).random((4, 28, 28)), jnp.float32)
    plain = BNCNN(impl="xla", conv_dropout=0.0, dense_dropout=0.0)
    zoomed = plain.clone(input_zoom=1.12)
    variables = plain.init(jax.random.PRNGKey(0), x, train=False)

    def logits(model: BNCNN, images: jax.Array, train: bool) -> jax.Array:
        if train:  # batch statistics: the updated ones come back beside the logits
            return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, images, train=False)

    for train in (True, False):
        np.testing.assert_allclose(logits(zoomed, x, train),
                                   logits(plain, center_zoom(x, 1.12), train),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(zoomed.apply(variables, x, train=False),
                           plain.apply(variables, x, train=False), atol=1e-3)
    with pytest.raises(ValueError, match="input_zoom"):
        BNCNN(input_zoom=0.0)
