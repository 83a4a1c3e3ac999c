"""Specification of mnist_jax.summary: parameter counts, the Keras-style table, FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from _model_helpers import random_params
from flax import linen as nn

from mnist_jax.models import CNN, MLP, create_model
from mnist_jax.summary import count_params, flops_per_example, summary


def test_count_params_counts_every_scalar_of_a_tree() -> None:
    tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros(())], "c": {}}
    assert count_params(tree) == 3 * 4 + 5 + 1
    assert count_params({}) == 0


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
    lines = mlp.splitlines()
    first, last = [i for i, line in enumerate(lines) if set(line) == {"="}]
    rows = lines[first + 1:last]  # the table between the two rules
    assert [row.split()[0] for row in rows] == ["flatten", "dense_0", "dropout_0", "act_0",
                                                "dense_1"]  # the layers, not the model itself


def test_flops_of_the_convnet_from_its_layer_shapes() -> None:
    # 2*MACs: 26*26*32*9 + 11*11*64*288 + 1600*10; training adds dW (all) and dX (not conv_0)
    f = flops_per_example(create_model("convnet"))
    assert f["forward"] == 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 10)
    assert f["train"] == 2 * (2 * 26 * 26 * 32 * 9 + 3 * (11 * 11 * 64 * 288 + 1600 * 10))


def test_flops_per_example() -> None:
    # MACs per layer; forward 2*MACs, training 4*MACs for the first layer (forward and
    # weight gradient) and 6*MACs for the others (plus the input gradient)
    conv0, rest = 26 * 26 * 32 * 3 * 3 * 1, 24 * 24 * 64 * 3 * 3 * 32 + 9216 * 128 + 128 * 10
    assert flops_per_example(CNN()) == {"forward": 2 * (conv0 + rest),
                                        "train": 4 * conv0 + 6 * rest}
    dense0, dense1 = 784 * 784, 784 * 10
    assert flops_per_example(MLP()) == {"forward": 2 * (dense0 + dense1),
                                        "train": 4 * dense0 + 6 * dense1}
    m = CNN(impl="xla", pool_after=(True, True))
    # XLA's own count (loop-free program) agrees within a few % (it adds elementwise ops)
    assert flops_per_example(m)["forward"] <= _xla_forward_flops(m) <= 1.05 * flops_per_example(
        m)["forward"]


def _xla_forward_flops(model: nn.Module) -> float:
    """XLA's count for one example's forward pass, on the CPU backend (a GPU's
    convolutions are library calls that XLA does not count)."""
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.zeros((8, 28, 28)), cpu)
    variables = jax.device_put(model.init(jax.random.key(0), x[:1], train=False), cpu)
    variables["params"] = random_params(model)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 8


class _ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), padding="VALID", use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=True)(x))


class _Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class _NestedNet(nn.Module):
    """Conv 3x3 -> 8, conv 3x3 -> 16, Dense 10, each inside a module of its own."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = _ConvBlock(16)(_ConvBlock(8)(x[..., None]))
        return _Head()(x)


def test_layers_inside_nested_modules_are_counted_and_summarised_at_the_top_level() -> None:
    conv0, conv1, dense = 26 * 26 * 8 * 9, 24 * 24 * 16 * 9 * 8, 24 * 24 * 16 * 10
    f = flops_per_example(_NestedNet())
    assert f == {"forward": 2 * (conv0 + conv1 + dense), "train": 4 * conv0 + 6 * (conv1 + dense)}
    assert f["forward"] <= _xla_forward_flops(_NestedNet()) <= 1.05 * f["forward"]
    text = summary(_NestedNet())
    block1 = 9 * 8 * 16 + 4 * 16  # conv kernel; BatchNorm scale, bias, mean and variance
    assert "_ConvBlock_1 (_ConvBlock)" in text and f"{block1:,}" in text
    assert "_Head_0 (_Head)" in text and "(None, 10)" in text
    assert "Dense_0" not in text and "Conv_0 (Conv)" not in text  # nested rows are not listed


def test_batchnorm_statistics_are_counted_as_non_trainable_params_as_keras_does() -> None:
    text = summary(create_model("bncnn"))
    stats = 2 * (32 + 32 + 64 + 64 + 256)  # moving mean and variance of the five BatchNorms
    assert f"Non-trainable params: {stats:,}" in text and "Trainable params: 330,858" in text
    assert f"Total params: {330_858 + stats:,}" in text
    assert "bn_dense (BatchNorm)" in text and f"{4 * 256:,}" in text
    assert "Non-trainable params: 0" in summary(CNN())
