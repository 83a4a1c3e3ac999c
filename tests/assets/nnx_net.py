"""A user's model written as Flax's NNX documentation writes modules: conv + BatchNorm +
Dropout + Linear, no mnist-jax imports. The NNX twin of ``net.py``; used by the NNX tests
through the API and through ``--model nnx_net.py:Net``."""

from functools import partial

import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, features: tuple = (8, 16), hidden: int = 64, dropout: float = 0.1,
                 *, rngs: nnx.Rngs):
        chans = (1, *features)
        self.convs = nnx.List([nnx.Conv(a, b, kernel_size=(3, 3), padding="VALID",
                                        use_bias=False, rngs=rngs)
                               for a, b in zip(chans, chans[1:])])
        self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in features])
        self.pool = partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        size = 28
        for _ in features:
            size = (size - 2) // 2
        self.dense = nnx.Linear(size * size * features[-1], hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = x[..., None] if x.ndim == 3 else x
        for conv, norm in zip(self.convs, self.norms):
            x = self.pool(nnx.relu(norm(conv(x))))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.dense(x)))
        return self.out(x).astype(jnp.float32)
