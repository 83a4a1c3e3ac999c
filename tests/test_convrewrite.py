"""A user's convolutions on the fast CPU path (``mnist_jax.convrewrite``): the rewritten
function computes what XLA's convolution computes, forward and backward, for a table of
convolutions and for whole user nets (linen and NNX); ``fit`` trains a user's module
through it, bitwise reproducibly and resuming exactly; what it cannot rewrite stays XLA's
with one warning."""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import mnist_jax as mj
from mnist_jax import convrewrite, models
from mnist_jax.config import TrainConfig
from mnist_jax.errors import UsageError
from mnist_jax.training import StepOptions, compile_fns, create_train_state

pytestmark = pytest.mark.usefixtures("full_fp32_matmuls")

TOL = dict(rtol=2e-4, atol=2e-4)


def _close(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def _value_and_grads(fn, *args):
    """fn's output and the gradients of sum(sin(output)) w.r.t. every argument, for fn
    and for its rewrite, in one compiled program."""
    def both(*a):
        loss = lambda f: lambda *b: jnp.sin(f(*b)).sum()
        fast = convrewrite.fast_convolutions(fn)
        return ((fn(*a), jax.grad(loss(fn), range(len(a)))(*a)),
                (fast(*a), jax.grad(loss(fast), range(len(a)))(*a)))
    return jax.jit(both)(*args)


# kernel, stride, padding, rhs dilation, feature groups, input channels per group,
# lhs dilation, layout
CONVS = [
    (1, 1, "SAME", 1, 1, 1, 1, "NHWC"),
    (2, 1, "SAME", 1, 1, 3, 1, "NHWC"),
    (3, 1, "VALID", 1, 1, 1, 1, "NHWC"),
    (3, 2, "SAME", 1, 1, 2, 1, "NHWC"),
    (4, 2, "VALID", 1, 1, 3, 1, "NHWC"),
    (5, 1, "SAME", 2, 1, 1, 1, "NHWC"),
    (7, 2, "SAME", 1, 1, 1, 1, "NHWC"),
    (3, 1, ((2, 1), (0, 3)), 2, 1, 2, 1, "NHWC"),
    (3, 2, ((1, -1), (2, 0)), 1, 1, 1, 1, "NHWC"),  # negative padding crops
    (3, 1, "SAME", 1, 3, 1, 1, "NHWC"),  # depthwise
    (3, 2, "VALID", 1, 2, 2, 1, "NCHW"),
    (3, 1, ((2, 1), (1, 2)), 1, 1, 2, 2, "NHWC"),  # input dilation (transposed conv)
]


@pytest.mark.parametrize("k,stride,pad,dil,groups,cin,lhs_dil,layout", CONVS)
def test_a_rewritten_convolution_and_its_gradients_equal_xlas(k, stride, pad, dil, groups, cin,
                                                              lhs_dil, layout):
    rng = np.random.default_rng(k * 100 + stride * 10 + groups)
    x = rng.normal(size=(2, 11, 9, cin * groups)).astype(np.float32)
    w = rng.normal(size=(k, k, cin, 2 * groups)).astype(np.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    if layout == "NCHW":
        x, w, dn = np.moveaxis(x, -1, 1), np.transpose(w, (3, 2, 0, 1)), ("NCHW", "OIHW", "NCHW")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), pad, lhs_dilation=(lhs_dil,) * 2,
                                        rhs_dilation=(dil, dil), dimension_numbers=dn,
                                        feature_group_count=groups)

    (ref, ref_grads), (out, grads) = _value_and_grads(conv, x, w)
    assert out.shape == ref.shape
    _close(out, ref)
    _close(grads, ref_grads)
    _only_plain_xla_convs(jax.make_jaxpr(convrewrite.fast_convolutions(conv))(x, w))


def test_a_pool_with_ties_sends_the_gradient_to_the_first_maximum_as_xla_does():
    x = np.zeros((1, 4, 6, 2), np.float32)  # all ties: XLA picks each window's first
    x[0, 1, 1, 0] = 1.0

    def pool(x):
        return nn.max_pool(x, (2, 3), (2, 3), padding=((0, 0), (0, 0))) * jnp.arange(1.0, 3.0)

    (ref, ref_grads), (out, grads) = _value_and_grads(pool, x)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(grads[0], ref_grads[0])


class SpeedrunNet(nn.Module):
    """The speedrun's layers written as a user would, with nn.Conv and nn.max_pool."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ((x - 0.1307) / 0.3081)[..., None]
        x = nn.relu(nn.max_pool(nn.Conv(24, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
        x = nn.relu(nn.max_pool(nn.Conv(32, (3, 3), padding="VALID")(x), (2, 2), (2, 2)))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class ResBlockNet(nn.Module):
    """A residual block with BatchNorm, a strided conv and a SAME pool."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x[..., None])))
        y = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        y = norm()(nn.Conv(8, (3, 3), use_bias=False)(y))
        x = nn.relu(x + y)
        x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("net", [SpeedrunNet(), ResBlockNet()], ids=["speedrun", "resblock"])
def test_a_user_net_computes_the_same_outputs_gradients_and_statistics(net):
    x = np.random.default_rng(0).random((6, 28, 28), np.float32)
    variables = net.init(jax.random.key(0), x)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def apply(params, x):
        if rest:
            return net.apply({"params": params, **rest}, x, train=True, mutable=list(rest))[0]
        return net.apply({"params": params}, x, train=True)

    (ref, ref_grads), (out, grads) = _value_and_grads(apply, params, x)
    _close(out, ref)
    _close(grads, ref_grads)
    if rest:  # the batch statistics the rewritten step carries on
        def stats(v, x):
            return net.apply(v, x, train=True, mutable=list(rest))[1]

        v = {"params": params, **rest}
        _close(jax.jit(convrewrite.fast_convolutions(stats))(v, x), jax.jit(stats)(v, x))


class NnxNet(nnx.Module):
    """Conv + BatchNorm + ReLU + pool, then conv + bias + ReLU, as Flax's NNX docs write it."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.norm(self.conv1(x[..., None]))), (2, 2), (2, 2))
        x = nnx.relu(self.conv2(x))
        return self.out(x.mean(axis=(1, 2)))


def test_an_nnx_net_merged_inside_a_function_computes_the_same():
    graphdef, params, rest = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
    x = np.random.default_rng(1).random((4, 28, 28), np.float32)

    def apply(params, rest, x):  # training mode: BatchNorm normalises by the batch
        return nnx.merge(graphdef, params, rest)(x)

    (ref, ref_grads), (out, grads) = _value_and_grads(apply, params, rest, x)
    _close(out, ref)
    _close(grads, ref_grads)


def test_the_built_in_fast_stack_and_relu_pass_through_untouched():
    model = models.create_model("cnn", impl="fast")  # NHWC: its 1-channel forward is XLA's
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)), train=False)
    x = np.random.default_rng(2).random((4, 28, 28), np.float32)
    apply = lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert "conv_general_dilated" in str(jax.make_jaxpr(apply)(variables, x))  # in its rule
    fast = jax.jit(convrewrite.fast_convolutions(apply))(variables, x)
    np.testing.assert_array_equal(fast, jax.jit(apply)(variables, x))


def test_convolutions_inside_remat_and_scan_are_rewritten():
    w = np.random.default_rng(3).normal(size=(3, 3, 2, 2)).astype(np.float32)
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 2)).astype(np.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def net(x, w):
        x = jax.checkpoint(conv)(x, w)
        return lax.scan(lambda c, _: (jnp.tanh(conv(c, w)), None), x, length=2)[0]

    (ref, ref_grads), (out, grads) = _value_and_grads(net, x, w)
    _close(out, ref)
    _close(grads, ref_grads)
    _only_plain_xla_convs(jax.make_jaxpr(convrewrite.fast_convolutions(net))(x, w))


def _only_plain_xla_convs(jaxpr) -> None:
    """What XLA still convolves in a rewritten function is canonical_conv's (one convolution
    each), never a convolution left as the model wrote it."""
    text = str(jaxpr)
    assert text.count("conv_general_dilated[") == text.count("name=canonical_conv"), text


@pytest.mark.parametrize("size,kernel,strides,pads", [
    (7, 3, (1, 1), ((1, 1), (0, 2))),
    (8, 3, (2, 2), ((0, 1), (1, 1))),  # a row of the input past the last window
    (7, 1, (2, 3), ((0, 0), (0, 0))),  # a strided 1x1 shortcut, rows and columns left over
    (9, 5, (3, 2), ((2, 2), (4, 0))),
])
def test_a_canonical_convolutions_gradients_are_plain_layout_convolutions(size, kernel, strides,
                                                                          pads):
    """The forward and both gradients of canonical_conv are NHWC x HWIO convolutions: none
    with exchanged dimension roles, which XLA:CPU runs slowly inside a loop."""
    x = np.random.default_rng(5).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    w = np.random.default_rng(6).normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
    f = lambda x, w: jnp.sum(jnp.sin(convrewrite.canonical_conv(x, w, pads, strides)))
    ref = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))))
    _close(jax.grad(f, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w))
    convs = [e for e in jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).eqns
             if e.primitive.name == "conv_general_dilated"]
    plain = "ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))"
    assert len(convs) == 2 and all(str(e.params["dimension_numbers"]) == plain for e in convs)


def test_a_convolution_it_cannot_rewrite_stays_xlas_with_one_warning_naming_the_layer():
    x = np.ones((4, 6, 6, 2), np.float32)
    w = np.ones((3, 3, 2, 4), np.float32)

    def grouped(x, w):
        with jax.named_scope("my_block"):
            return lax.conv_general_dilated(x, w, (1, 1), "SAME", batch_group_count=2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fast = convrewrite.fast_convolutions(grouped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(fast)(x, w)
        jax.jit(lambda x, w: fast(x, w) * 2)(x, w)  # traced again: no second warning
    slow = [w for w in caught if issubclass(w.category, convrewrite.SlowConvolutionWarning)]
    assert len(slow) == 1, [str(w.message) for w in slow]
    assert "my_block" in str(slow[0].message) and "batch_group_count" in str(slow[0].message)
    np.testing.assert_array_equal(out, grouped(x, w))


def _epoch_hlo(model, convs: str) -> str:
    state = create_train_state(model, optax.adam(1e-3), 0)
    x = jax.ShapeDtypeStruct((512, 28, 28), jnp.uint8)
    y = jax.ShapeDtypeStruct((512,), jnp.int32)
    epoch = compile_fns(256, 1, options=StepOptions(convs=convs)).train_epoch
    return epoch.lower(state, x, y).as_text()


def test_the_training_epoch_runs_the_fast_form_on_the_cpu_unless_told_xla():
    assert jax.default_backend() == "cpu"
    assert "convolution" not in _epoch_hlo(SpeedrunNet(), "auto")
    assert "convolution" in _epoch_hlo(SpeedrunNet(), "xla")
    assert convrewrite.resolve("auto", "gpu") is False and convrewrite.resolve("fast", "gpu")


def test_fit_with_a_user_conv_net_repeats_bitwise_and_resumes_exactly(digits):
    config = TrainConfig(epochs=2, batch_size=128, seeds=(3,))
    net = ResBlockNet()
    whole = mj.fit(config, digits, model=net)
    again = mj.fit(config, digits, model=net)
    first = mj.fit(dataclasses.replace(config, epochs=1), digits, model=net)
    resumed = mj.fit(config, digits, model=net, state=first.state, history=first.history)
    for other in (again, resumed):
        for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(other.state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.test["accuracy"] > 0.5  # it learned the toy digits


def test_impl_steers_a_user_module_and_stays_refused_for_the_mlp():
    user = TrainConfig.from_recipe("tutorial", model="tests/assets/net.py:Net", impl="xla")
    assert user.impl == "xla"
    with pytest.raises(UsageError, match="--impl is a setting of .* a module of yours; "
                                         "--model mlp does not use it"):
        TrainConfig.from_recipe("tutorial", impl="xla")


def test_a_user_conv_net_trains_with_library_fusions_and_nothing_else_does():
    """On the CPU the epoch of a user's module with convolution kernels, rewritten, compiles
    with XLA's library fusions; its MLP, the built-in models and --impl xla do not."""
    from mnist_jax.run import epoch_compile_options
    from mnist_jax.training import CPU_LIBRARY_FUSIONS, stack_states

    class UserMLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    fusions = tuple(CPU_LIBRARY_FUSIONS.items())
    conv_net = create_train_state(ResBlockNet(), optax.adam(1e-3), 0)
    assert epoch_compile_options(conv_net) == fusions
    assert epoch_compile_options(stack_states([conv_net, conv_net])) == fusions
    assert epoch_compile_options(conv_net, StepOptions(convs="xla")) == ()
    mlp = create_train_state(UserMLP(), optax.adam(1e-3), 0)
    assert epoch_compile_options(stack_states([mlp, mlp])) == ()
    assert epoch_compile_options(create_train_state(models.create_model("bncnn"),
                                                    optax.adam(1e-3), 0)) == ()


def test_the_epoch_with_library_fusions_trains_as_xlas_default_does():
    from mnist_jax.training import CPU_LIBRARY_FUSIONS
    state = create_train_state(ResBlockNet(), optax.adam(1e-3), 0)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, 256, (512, 28, 28), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, 512), jnp.int32)
    fused = compile_fns(128, 1, epoch_options=tuple(CPU_LIBRARY_FUSIONS.items())).train_epoch
    default = compile_fns(128, 1).train_epoch
    assert fused.lower(state, x, y).compile().as_text() != default.lower(state, x, y).compile().as_text()
    _close(fused(state, x, y), default(state, x, y))
