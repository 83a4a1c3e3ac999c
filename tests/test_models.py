"""Specification of mnist_jax.models: the tutorial architectures, the fast CPU
path's equivalence with XLA's conv/max-pool, summary, FLOP counts, errors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_jax import models
from mnist_jax.models import (CNN, MLP, MODEL_NAMES, count_params, create_model, flops_per_example,
                              summary)

# fast vs xla: each gradient leaf (and the input gradient) must agree with
# ||fast - xla|| <= RTOL * ||xla|| (L2 over the leaf), outputs likewise; float32
# summation order differs (im2col matmul vs XLA's convolution), nothing else.
RTOL = 2e-5


@pytest.fixture
def full_fp32_matmuls():
    """fp32 products at full precision: on a GPU the default lets both paths use tf32
    matrix units (~1e-3 relative error), which would hide what the comparison checks."""
    with jax.default_matmul_precision("highest"):
        yield


def _init(model: Any, x: jax.Array, seed: int = 0) -> Any:
    init = jax.jit(lambda k, x: model.init(k, x, train=False)["params"])
    return init(jax.random.key(seed), x)


def _random_params(model: Any, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0,
                   bias: float = 0.0) -> Any:
    """Params shaped like ``model.init``'s (via eval_shape, no compile):
    N(0, 1/fan_in) kernels, N(0, bias^2) biases."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path: Any, s: Any) -> jax.Array:
        fan_in = int(np.prod(s.shape[:-1])) or 1
        scale = bias if path[-1].key == "bias" else fan_in ** -0.5
        return jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _n_params(model: Any, shape: tuple[int, ...] = (1, 28, 28)) -> int:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return count_params(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))


def _images(n: int, seed: int = 0, shape: tuple[int, ...] = (28, 28)) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed + 100), (n, *shape))


def _close(a: jax.Array, b: jax.Array, rtol: float = RTOL) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, ref = np.linalg.norm(a - b), np.linalg.norm(b)
    assert err <= rtol * ref + 1e-12, f"relative error {err / max(ref, 1e-30):.2e}"


# ---------------------------------------------------------------- architecture


def test_param_counts_match_keras() -> None:
    assert _n_params(MLP()) == 623_290
    assert _n_params(CNN(impl="xla")) == 1_199_882
    assert _n_params(CNN(impl="fast")) == 1_199_882
    assert _n_params(CNN(pool_after=(True, True))) == 225_034
    assert count_params(_init(MLP(), _images(1))) == 623_290


def test_mlp_flattens_every_layout_and_returns_float32_logits() -> None:
    x = _images(3)
    m = MLP()
    p = _random_params(m)
    ref = m.apply({"params": p}, x, train=False)
    assert ref.shape == (3, 10) and ref.dtype == jnp.float32
    for layout in (x[..., None], x.reshape(3, 784)):
        np.testing.assert_array_equal(m.apply({"params": p}, layout, train=False), ref)
    # dense -> dropout -> activation: the first layer is a 784x784 Dense
    assert p["dense_0"]["kernel"].shape == (784, 784) and p["dense_1"]["kernel"].shape == (784, 10)


@pytest.mark.parametrize("model", [MLP(), CNN(impl="xla", features=(4, 8), dense=(16,)),
                                   CNN(impl="fast", features=(4, 8), dense=(16,))],
                         ids=["mlp", "cnn-xla", "cnn-fast"])
def test_dropout_only_in_train_mode(model: Any) -> None:
    x = _images(4)
    p = _random_params(model)
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
    x = _images(2)
    p = _random_params(m)
    np.testing.assert_array_equal(m.apply({"params": p}, x, train=True),
                                  m.apply({"params": p}, x, train=False))


def test_cnn_input_layouts_and_appendix_shapes() -> None:
    x = _images(2)
    for impl in ("xla", "fast"):
        m = CNN(impl=impl, pool_after=(True, True))
        p = _random_params(m)
        apply = jax.jit(lambda p, x: m.apply({"params": p}, x, train=False))
        out = apply(p, x)
        assert out.shape == (2, 10) and out.dtype == jnp.float32
        np.testing.assert_array_equal(apply(p, x[..., None]), out)
        # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5: Dense sees 5*5*64
        assert p["dense_0"]["kernel"].shape == (5 * 5 * 64, 128)
    text = summary(CNN(pool_after=(True, True)))
    for shape in ("(None, 26, 26, 32)", "(None, 13, 13, 32)", "(None, 11, 11, 64)",
                  "(None, 5, 5, 64)", "(None, 1600)"):
        assert shape in text


def test_impl_resolution_and_identical_init() -> None:
    assert CNN().resolved_impl == ("fast" if jax.default_backend() == "cpu" else "xla")
    assert CNN(impl="xla").resolved_impl == "xla"
    # "auto" trains on the fast path but infers with XLA's convolution (faster forward)
    assert CNN().impl_for(train=False) == "xla"
    assert CNN(impl="fast").impl_for(train=False) == "fast"  # an explicit choice holds
    kw = {"features": (4, 8), "dense": (16,)}
    x = _images(1, shape=(12, 12))
    a, b = (CNN(impl=i, **kw).init(jax.random.key(3), x, train=False)["params"]
            for i in ("xla", "fast"))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    shapes = jax.eval_shape(lambda x: CNN(impl="fast").init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 28, 28), jnp.float32))["params"]
    assert shapes["conv_1"]["kernel"].shape == (3, 3, 32, 64)
    assert shapes["conv_1"]["bias"].shape == (64,)


# ------------------------------------------------------------ fast == xla


CONFIGS = {
    "classic": {},
    "appendix": {"pool_after": (True, True)},  # 11x11 -> pool 5x5: the last row/column unused
    "convnet": {"pool_after": (True, True), "conv_dropout": 0.5, "dense": ()},
    "k5-same": {"kernel_size": 5, "padding": "SAME", "features": (8, 16), "dense": (32,)},
    "3conv-pool3-k4": {"features": (4, 8, 8), "pool_after": (True, False, True), "pool_size": 3,
                       "kernel_size": 4, "padding": "SAME", "dense": (16,)},
}


def _outputs_and_grads(model: Any, params: Any, x: jax.Array, y: jax.Array):
    """Eval-mode logits, and train-mode (dropout on, fixed rng) loss, logits and
    gradients wrt params and input, in one compiled call."""
    def loss(p, x):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(7)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    def f(p, x):
        (l, logits), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return model.apply({"params": p}, x, train=False), l, logits, grads

    return jax.jit(f)(params, x)


def _assert_fast_matches_xla(xla: Any, fast: Any, params: Any, x: jax.Array, y: jax.Array):
    ev_x, l_x, tr_x, (gp_x, gx_x) = _outputs_and_grads(xla, params, x, y)
    ev_f, l_f, tr_f, (gp_f, gx_f) = _outputs_and_grads(fast, params, x, y)
    _close(ev_f, ev_x)
    _close(tr_f, tr_x)
    np.testing.assert_allclose(l_f, l_x, rtol=RTOL)
    jax.tree.map(_close, gp_f, gp_x)
    _close(gx_f, gx_x)


@pytest.mark.usefixtures("full_fp32_matmuls")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_xla_outputs_and_gradients(name: str) -> None:
    kw = CONFIGS[name]
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = _images(6, seed=len(name))
    params = _random_params(xla, seed=len(name), bias=0.1)
    _assert_fast_matches_xla(xla, fast, params, x, jnp.arange(6) % 10)


@pytest.mark.usefixtures("full_fp32_matmuls")
def test_fast_chunked_with_remainder_matches_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch split into scan chunks plus a remainder chunk (and per-layer blocks)."""
    # largest im2col per example: conv_1, 8*8 positions x 3*3*4 values, float32
    monkeypatch.setattr(models, "_FAST_CHUNK_BYTES", 2 * 8 * 8 * 36 * 4)  # 2 examples/chunk
    kw = {"features": (4, 8), "dense": ()}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = _images(7, shape=(12, 12))
    params = _random_params(xla, (1, 12, 12), bias=0.1)
    for fuse in (True, False):
        monkeypatch.setattr(models, "_FAST_FUSE_STACK", fuse)
        _assert_fast_matches_xla(xla, fast, params, x, jnp.arange(7))


@pytest.mark.usefixtures("full_fp32_matmuls")
def test_fast_path_under_vmap_over_models() -> None:
    """training.py may vmap a step over stacked models: the custom VJP batches."""
    kw = {"features": (4, 8), "dense": ()}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = _images(3, shape=(12, 12))
    ps = [_random_params(xla, (1, 12, 12), seed=s, bias=0.1) for s in (1, 2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)

    def grad(m):
        return jax.grad(lambda p: m.apply({"params": p}, x, train=False).sum())

    got = jax.jit(jax.vmap(grad(fast)))(stacked)
    for i, p in enumerate(ps):
        jax.tree.map(lambda g, r: _close(g[i], r), got, jax.jit(grad(xla))(p))


def test_pool_gradient_goes_to_first_maximum_like_select_and_scatter() -> None:
    """Ties inside a pooling window: XLA routes the whole gradient to the first
    maximum; the fast path must do the same (not split it)."""
    kw = {"features": (2,), "kernel_size": 1, "dense": (), "conv_dropout": 0.0}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = jnp.ones((2, 4, 4)).at[0, 0, 1].set(0.5).at[1, 3, 3].set(2.0)  # plateaus of ties
    p = _random_params(xla, (2, 4, 4))
    p = {**p, "conv_0": {"kernel": jnp.ones((1, 1, 1, 2)), "bias": jnp.array([0.0, -1.0])}}

    def f(m):
        return jax.jit(jax.grad(lambda x: m.apply({"params": p}, x, train=False).sum()))(x)

    np.testing.assert_allclose(f(fast), f(xla), rtol=1e-6, atol=1e-7)


def test_unsupported_padding_falls_back_to_xla() -> None:
    m = CNN(impl="fast", padding="CIRCULAR", features=(4, 8), dense=(16,))
    assert m.resolved_impl == "xla"
    x = _images(2)
    p = _random_params(m)
    np.testing.assert_array_equal(m.apply({"params": p}, x, train=False),
                                  m.clone(impl="xla").apply({"params": p}, x, train=False))
    assert p["dense_0"]["kernel"].shape == (28 * 28 * 8 // 4, 16)  # SAME-sized, pooled once


def test_bfloat16_compute_keeps_float32_params() -> None:
    x = _images(2)
    for m in (MLP(dtype=jnp.bfloat16),
              CNN(impl="fast", dtype="bfloat16", features=(4, 8), dense=(16,))):
        shapes = jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
        p = _random_params(m)
        out = m.apply({"params": p}, x, train=False)
        assert out.dtype == jnp.float32
        ref = m.clone(dtype=jnp.float32).apply({"params": p}, x, train=False)
        np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------ helpers


def test_summary_lists_every_layer_and_totals() -> None:
    text = summary(CNN())
    for name in ("conv_0 (Conv)", "conv_1 (Conv)", "pool_1 (MaxPool)", "conv_dropout (Dropout)",
                 "flatten (Flatten)", "dense_0 (Dense)", "dense_1 (Dense)"):
        assert name in text
    assert "(None, 12, 12, 64)" in text and "(None, 9216)" in text
    assert "Total params: 1,199,882" in text and "1,179,776" in text
    assert max(map(len, text.splitlines())) <= 80
    mlp = summary(MLP())
    for name in ("dense_0 (Dense)", "dropout_0 (Dropout)", "act_0 (Activation)", "dense_1 (Dense)"):
        assert name in mlp
    assert "Total params: 623,290" in mlp and "615,440" in mlp


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
    # 2*MACs: 26*26*32*9 + 11*11*64*288 + 1600*10; training adds dW (all) and dX (not conv_0)
    f = flops_per_example(m)
    assert f["forward"] == 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 10)
    assert f["train"] == 2 * (2 * 26 * 26 * 32 * 9 + 3 * (11 * 11 * 64 * 288 + 1600 * 10))


def test_cli_model_choices_are_the_model_names() -> None:
    from mnist_jax.config import MODELS
    assert MODELS == MODEL_NAMES


def test_flops_per_example() -> None:
    # 2*MACs: conv_0 26*26*32*9, conv_1 24*24*64*288, dense 9216*128, 128*10
    assert flops_per_example(CNN()) == {"forward": 23_984_896, "train": 71_565_312}
    assert flops_per_example(MLP()) == {"forward": 1_244_992, "train": 2_505_664}
    m = CNN(impl="xla", pool_after=(True, True))
    f = flops_per_example(m)
    # XLA's own count (loop-free program) agrees within a few % (it adds elementwise ops)
    # on the CPU backend: a GPU's convolutions are library calls that XLA does not count
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.zeros((8, 28, 28)), cpu)
    p = jax.device_put(_random_params(m), cpu)
    cost = jax.jit(lambda p, x: m.apply({"params": p}, x, train=False)).lower(p, x).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert f["forward"] <= cost["flops"] / 8 <= 1.05 * f["forward"]
