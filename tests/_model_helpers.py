"""Helpers shared by the model tests (test_models, test_fastconv, test_summary)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.summary import count_params

# fast vs xla: each gradient leaf (and the input gradient) must agree with
# ||fast - xla|| <= RTOL * ||xla|| (L2 over the leaf), outputs likewise; float32
# summation order differs (im2col matmul vs XLA's convolution), nothing else.
RTOL = 2e-5


def param_shapes(model: Any, shape: tuple[int, ...] = (1, 28, 28)) -> Any:
    """``model.init``'s parameter tree as shapes (no compile)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]


def n_params(model: Any, shape: tuple[int, ...] = (1, 28, 28)) -> int:
    return count_params(param_shapes(model, shape))


def random_params(model: Any, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0,
                  bias: float = 0.0) -> Any:
    """Params shaped like ``model.init``'s: N(0, 1/fan_in) kernels, N(0, bias^2) biases."""
    rng = np.random.default_rng(seed)

    def draw(path: Any, s: Any) -> jax.Array:
        fan_in = int(np.prod(s.shape[:-1])) or 1
        scale = bias if path[-1].key == "bias" else fan_in ** -0.5
        return jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(model, shape))


def images(n: int, seed: int = 0, shape: tuple[int, ...] = (28, 28)) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed + 100), (n, *shape))


def close(a: jax.Array, b: jax.Array, rtol: float = RTOL) -> None:
    """``||a - b|| <= rtol * ||b||`` over the whole array (L2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, ref = np.linalg.norm(a - b), np.linalg.norm(b)
    assert err <= rtol * ref + 1e-12, f"relative error {err / max(ref, 1e-30):.2e}"
