"""A user's model, as a research script would write it: conv + BatchNorm, no mnist-jax
imports. Used by the user-model tests through the API and through ``--model net.py:Net``."""

import flax.linen as nn
import jax.numpy as jnp


class Net(nn.Module):
    features: tuple = (8, 16)  # small: XLA's CPU convolution gradients are slow
    hidden: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = x[..., None] if x.ndim == 3 else x
        for f in self.features:
            x = nn.Conv(f, (3, 3), padding="VALID", use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x).astype(jnp.float32)
