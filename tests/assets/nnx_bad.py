"""NNX modules that cannot serve as MNIST classifiers, one way each (the bad-input table)."""

import jax.numpy as jnp
from flax import nnx


class Raises(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        raise ValueError("width must be even")


class NoRngs(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((784, 10)))

    def __call__(self, x):
        return x.reshape(x.shape[0], -1) @ self.w


class ForwardFails(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.lin = nnx.Linear(100, 10, rngs=rngs)  # 784 pixels come in

    def __call__(self, x):
        return self.lin(x.reshape(x.shape[0], -1))


class SevenClasses(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.lin = nnx.Linear(784, 7, rngs=rngs)

    def __call__(self, x):
        return self.lin(x.reshape(x.shape[0], -1))


class IntegerOutput(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.lin = nnx.Linear(784, 10, rngs=rngs)

    def __call__(self, x):
        return jnp.argsort(self.lin(x.reshape(x.shape[0], -1)), axis=-1)


class NotAModule:
    def __init__(self, *, rngs=None):
        pass
