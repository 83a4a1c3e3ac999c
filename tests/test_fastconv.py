"""Specification of mnist_jax.fastconv through ``CNN(impl="fast")``: the same outputs
and gradients as XLA's conv / max-pool ("xla") up to float32 summation order, with
chunked batches, per-layer stacks, vmap over models, and ties inside a pooling window."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _model_helpers import RTOL, close, images, random_params

from mnist_jax import fastconv
from mnist_jax.models import CNN

CONFIGS = {
    "classic": {},
    "appendix": {"pool_after": (True, True)},  # 11x11 -> pool 5x5: the last row/column unused
    "convnet": {"pool_after": (True, True), "conv_dropout": 0.5, "dense": ()},
    "k5-same": {"kernel_size": 5, "padding": "SAME", "features": (8, 16), "dense": (32,)},
    "3conv-pool3-k4": {"features": (4, 8, 8), "pool_after": (True, False, True), "pool_size": 3,
                       "kernel_size": 4, "padding": "SAME", "dense": (16,)},
    # the record "speedrun" net: a kernel size per layer
    "speedrun-k5-k3": {"features": (24, 32), "kernel_size": (5, 3), "pool_after": (True, True),
                       "dense": (256,), "conv_dropout": 0.0, "dense_dropout": 0.0},
    # per-layer SAME padding: 5x5 pads (2, 2), 2x2 pads (0, 1)
    "k5-k2-same": {"features": (4, 8), "kernel_size": (5, 2), "padding": "SAME",
                   "pool_after": (False, True), "dense": (16,)},
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
    close(ev_f, ev_x)
    close(tr_f, tr_x)
    np.testing.assert_allclose(l_f, l_x, rtol=RTOL)
    jax.tree.map(close, gp_f, gp_x)
    close(gx_f, gx_x)


# The two layouts the stack computes in: NHWC, and channel-major (CNHW) for every stack.
LAYOUTS = {"nhwc": None, "channel-major": 1}


@pytest.mark.usefixtures("full_fp32_matmuls")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_xla_outputs_and_gradients(name: str, layout: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastconv, "CHANNEL_MAJOR_MIN_TAPS", LAYOUTS[layout])
    kw = CONFIGS[name]
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = images(6, seed=len(name))
    params = random_params(xla, seed=len(name), bias=0.1)
    _assert_fast_matches_xla(xla, fast, params, x, jnp.arange(6) % 10)


@pytest.mark.usefixtures("full_fp32_matmuls")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["speedrun-k5-k3", "convnet", "classic", "3conv-pool3-k4"])
def test_fast_matches_xla_when_the_input_is_data(name: str, layout: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients wrt the parameters only, as in training: the stack skips its input
    gradient, and channel-major computes the first layer pool-major, stores the hidden
    activations and batches in padded chunks (7 = 3 chunks of 3 with 2 padded)."""
    monkeypatch.setattr(fastconv, "CHANNEL_MAJOR_MIN_TAPS", LAYOUTS[layout])
    kw = CONFIGS[name]
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x, y = images(7, seed=3), jnp.arange(7) % 10
    params = random_params(xla, seed=3, bias=0.1)

    def grads(m: Any):
        def loss(p):
            logits = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(7)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jax.jit(jax.grad(loss))(params)

    want = grads(xla)
    jax.tree.map(close, grads(fast), want)  # one chunk
    monkeypatch.setattr(fastconv, "_chunk_size", lambda n, per_example_bytes: min(n, 3))
    jax.tree.map(close, grads(fast), want)


@pytest.mark.usefixtures("full_fp32_matmuls")
def test_fast_chunked_with_remainder_matches_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch split into scan chunks plus a remainder chunk (and per-layer blocks)."""
    # largest im2col per example: conv_1, 8*8 positions x 3*3*4 values, float32
    monkeypatch.setattr(fastconv, "CHUNK_BYTES", 2 * 8 * 8 * 36 * 4)  # 2 examples/chunk
    kw = {"features": (4, 8), "dense": ()}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = images(7, shape=(12, 12))
    params = random_params(xla, (1, 12, 12), bias=0.1)
    for fuse in (True, False):
        monkeypatch.setattr(fastconv, "FUSE_STACK", fuse)
        _assert_fast_matches_xla(xla, fast, params, x, jnp.arange(7))


@pytest.mark.usefixtures("full_fp32_matmuls")
def test_fast_path_under_vmap_over_models() -> None:
    """training.py may vmap a step over stacked models: the custom VJP batches."""
    kw = {"features": (4, 8), "dense": ()}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = images(3, shape=(12, 12))
    ps = [random_params(xla, (1, 12, 12), seed=s, bias=0.1) for s in (1, 2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)

    def grad(m):
        return jax.grad(lambda p: m.apply({"params": p}, x, train=False).sum())

    got = jax.jit(jax.vmap(grad(fast)))(stacked)
    for i, p in enumerate(ps):
        jax.tree.map(lambda g, r: close(g[i], r), got, jax.jit(grad(xla))(p))


def test_pool_gradient_goes_to_first_maximum_like_select_and_scatter() -> None:
    """Ties inside a pooling window: XLA routes the whole gradient to the first
    maximum; the fast path must do the same (not split it)."""
    kw = {"features": (2,), "kernel_size": 1, "dense": (), "conv_dropout": 0.0}
    xla, fast = CNN(impl="xla", **kw), CNN(impl="fast", **kw)
    x = jnp.ones((2, 4, 4)).at[0, 0, 1].set(0.5).at[1, 3, 3].set(2.0)  # plateaus of ties
    p = random_params(xla, (2, 4, 4))
    p = {**p, "conv_0": {"kernel": jnp.ones((1, 1, 1, 2)), "bias": jnp.array([0.0, -1.0])}}

    def f(m):
        return jax.jit(jax.grad(lambda x: m.apply({"params": p}, x, train=False).sum()))(x)

    np.testing.assert_allclose(f(fast), f(xla), rtol=1e-6, atol=1e-7)


def test_layer_config_pads_like_nn_conv_and_refuses_other_paddings() -> None:
    assert fastconv.layer_config("valid", 5, 2) == (((0, 0), (0, 0)), 2)
    assert fastconv.layer_config("SAME", 4, 0) == (((1, 2), (1, 2)), 0)  # nn.Conv: low = (k-1)//2
    with pytest.raises(ValueError, match="CIRCULAR"):
        fastconv.layer_config("CIRCULAR", 3, 0)
