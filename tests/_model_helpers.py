"""Helpers shared by the model tests (test_models, test_fastconv, test_summary, and the
user-model acceptance runs of test_usermodel and test_nnx)."""

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


def assert_each_seed_scores(result: Any, dataset: Any, floor: float, what: str) -> None:
    """Every model of a two-seed ``fit`` reaches ``floor`` test accuracy, and scores the
    same through the one-model API (``mj.evaluate`` of ``mj.unstack_state``)."""
    import mnist_jax as mj
    accs = np.asarray(result.test["accuracy"])
    print(f"{what}: test accuracy {accs}")
    assert accs.shape == (2,) and (accs >= floor).all(), accs
    for i in range(2):
        one = mj.unstack_state(result.state, i)
        assert abs(mj.evaluate(one, dataset.test_images, dataset.test_labels)["accuracy"]
                   - accs[i]) <= 1e-6


def assert_statistics_trained_per_model(result: Any, stats: Any, dataset: Any,
                                        features: int) -> None:
    """BatchNorm statistics ``stats`` (a ``{"mean", "var"}`` of a two-seed ``result``'s
    model_state) were trained, one set per model, and evaluation uses them."""
    import mnist_jax as mj
    assert stats["mean"].shape == (2, features) and stats["var"].shape == (2, features)
    assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)
    assert not np.allclose(stats["mean"][0], stats["mean"][1])  # one set per seed
    one = mj.unstack_state(result.state, 0)
    fresh = one.replace(model_state=jax.tree.map(np.ones_like, one.model_state))
    x, y = dataset.test_images[:2000], dataset.test_labels[:2000]
    assert mj.evaluate(fresh, x, y)["accuracy"] < mj.evaluate(one, x, y)["accuracy"]


def sgd_on_a_quarter(dataset: Any, model: Any, floor: float, what: str) -> None:
    """``model`` trained one epoch on a quarter of MNIST with ``optax.sgd(0.05, momentum
    0.9)`` reaches ``floor``, scored by ``mj.evaluate`` as ``fit`` scored it."""
    import dataclasses

    import optax

    import mnist_jax as mj
    quarter = dataclasses.replace(dataset, train_images=dataset.train_images[:15_000],
                                  train_labels=dataset.train_labels[:15_000])
    result = mj.fit(mj.TrainConfig(epochs=1), quarter, model=model,
                    optimizer=optax.sgd(0.05, momentum=0.9))
    scores = mj.evaluate(result.state, dataset.test_images, dataset.test_labels)
    print(f"{what}, sgd(0.05, momentum 0.9), 117 steps: {scores}")
    assert scores["accuracy"] >= floor
    assert abs(scores["accuracy"] - result.test["accuracy"]) <= 1e-6
    assert mj.predict_classes(result.state, dataset.test_images[:10]).shape == (10,)
