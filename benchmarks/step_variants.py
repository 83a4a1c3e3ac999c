"""Time one training step (batch 128) of each model variant, side by side.

A step is ``jax.jit`` of: forward in train mode (dropout on), softmax
cross-entropy, ``value_and_grad``, ``optax.adam`` update.  Every variant is
compiled first, then the variants are timed in interleaved rounds (so a busy
machine slows them all alike) and the median is printed, with the compiled
temp-buffer size and the page faults per step.

    python benchmarks/step_variants.py                 # all variants
    python benchmarks/step_variants.py xla fast        # a subset
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/step_variants.py

(On this VM each fresh 4 KiB page costs ~1-4 us: XLA:CPU allocates a step's
temporaries anew on every call, so temp MB translate directly into time;
transparent huge pages via the glibc tunable above remove most of it.)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402

from mnist_jax import fastconv  # noqa: E402
from mnist_jax.models import CNN, MLP, create_model  # noqa: E402
from mnist_jax.summary import flops_per_example  # noqa: E402


# ---- naive formulations, for reference (same param tree as CNN) -----------

def _conv_im2col_autodiff(x, kernel, bias):
    kh, kw, ci, co = kernel.shape
    return jnp.dot(fastconv._im2col(x, kh, kw), kernel.reshape(-1, co)) + bias


def _pool_reshape(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _conv_xla(x, kernel, bias):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


class NaiveCNN(nn.Module):
    """Classic CNN with pluggable conv / pool functions (autodiff gradients)."""

    conv: Callable = _conv_xla
    pool: Callable = _pool_reshape

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x[..., None]
        for i, f in enumerate((32, 64)):
            kernel, bias = _ParamConv(f, name=f"conv_{i}")(x.shape[-1])
            x = jax.nn.relu(self.conv(x, kernel, bias))
        x = self.pool(x)
        x = nn.Dropout(0.25, deterministic=not train, name="conv_dropout")(x)
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(nn.Dense(128, name="dense_0")(x))
        x = nn.Dropout(0.5, deterministic=not train, name="dense_dropout_0")(x)
        return nn.Dense(10, name="dense_1")(x)


class _ParamConv(nn.Module):
    features: int

    @nn.compact
    def __call__(self, cin: int):
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return k, b


# ---- harness ----------------------------------------------------------------

def make_step(model: nn.Module, batch: int, input_shape=(28, 28)):
    x = jnp.asarray(np.random.RandomState(0).rand(batch, *input_shape), jnp.float32)
    y = jnp.asarray(np.random.RandomState(1).randint(0, 10, batch))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    rng = jax.random.key(1)

    def step(params, opt, x, y, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    compiled = jax.jit(step).lower(params, opt, x, y, rng).compile()
    args = (params, opt, x, y, rng)
    return compiled, args


def variants(batch: int) -> dict[str, Callable[[], Any]]:
    def patched(model, **settings):
        """Build with module-level knobs of mnist_jax.fastconv temporarily set."""
        def build():
            old = {k: getattr(fastconv, k) for k in settings}
            for k, v in settings.items():
                setattr(fastconv, k, v)
            try:
                return make_step(model, batch)
            finally:
                for k, v in old.items():
                    setattr(fastconv, k, v)
        return build

    fast = CNN(impl="fast")
    return {
        "xla": lambda: make_step(CNN(impl="xla"), batch),
        "xla-conv+reshape-pool": lambda: make_step(NaiveCNN(_conv_xla, _pool_reshape), batch),
        "im2col-autodiff+reshape-pool": lambda: make_step(
            NaiveCNN(_conv_im2col_autodiff, _pool_reshape), batch),
        "fast": lambda: make_step(CNN(impl="fast"), batch),
        "fast-per-layer": patched(fast, FUSE_STACK=False),
        "fast-chunk1MB": patched(fast, CHUNK_BYTES=1 << 20),
        "fast-chunk4MB": patched(fast, CHUNK_BYTES=4 << 20),
        "fast-chunk8MB": patched(fast, CHUNK_BYTES=8 << 20),
        "fast-nochunk": patched(fast, CHUNK_BYTES=1 << 40),
        "xla-bf16": lambda: make_step(CNN(impl="xla", dtype=jnp.bfloat16), batch),
        "fast-bf16": lambda: make_step(CNN(impl="fast", dtype=jnp.bfloat16), batch),
        "appendix-xla": lambda: make_step(CNN(impl="xla", pool_after=(True, True)), batch),
        "appendix-fast": lambda: make_step(CNN(impl="fast", pool_after=(True, True)), batch),
        "convnet-xla": lambda: make_step(create_model("convnet", impl="xla"), batch),
        "convnet-fast": lambda: make_step(create_model("convnet", impl="fast"), batch),
        "convnet-fast-chunk1MB": patched(create_model("convnet", impl="fast"),
                                         CHUNK_BYTES=1 << 20),
        "convnet-fast-chunk16MB": patched(create_model("convnet", impl="fast"),
                                          CHUNK_BYTES=16 << 20),
        "convnet-fast-nochunk": patched(create_model("convnet", impl="fast"),
                                        CHUNK_BYTES=1 << 40),
        "convnet-fast-im2col0": patched(create_model("convnet", impl="fast"), XLA_CONV_MAX_CIN=0),
        "fast-im2col0": patched(fast, XLA_CONV_MAX_CIN=0),
        "mlp": lambda: make_step(MLP(), batch),
        "mlp-bf16": lambda: make_step(MLP(dtype=jnp.bfloat16), batch),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="variants to time (default: all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="steps per timed sample")
    a = ap.parse_args(argv)
    table = variants(a.batch)
    names = a.names or list(table)
    steps = {}
    for n in names:
        steps[n] = table[n]()
        jax.block_until_ready(steps[n][0](*steps[n][1]))
    times: dict[str, list[float]] = {n: [] for n in names}
    faults = {n: 0 for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            fn, args = steps[n]
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            for _ in range(a.inner):
                out = fn(*args)
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / a.inner)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[n] += r1.ru_minflt - r0.ru_minflt
            cpu[n].append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / a.inner)
    fl = {"cnn": flops_per_example(CNN())["train"] * a.batch,
          "appendix": flops_per_example(CNN(pool_after=(True, True)))["train"] * a.batch,
          "convnet": flops_per_example(create_model("convnet"))["train"] * a.batch,
          "mlp": flops_per_example(MLP())["train"] * a.batch}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {a.batch}, "
          f"median of {a.rounds} rounds x {a.inner} steps")
    print(f"{'variant':30s} {'ms/step':>8s} {'cpu ms':>8s} {'GFLOP/s':>8s} {'temp MB':>8s} "
          f"{'faults':>8s}")
    for n in names:
        fn, _ = steps[n]
        t = float(np.median(times[n]))
        kind = next((k for k in ("mlp", "appendix", "convnet") if n.startswith(k)), "cnn")
        temp = fn.memory_analysis().temp_size_in_bytes / 2**20
        print(f"{n:30s} {t * 1e3:8.1f} {np.median(cpu[n]) * 1e3:8.1f} {fl[kind] / t / 1e9:8.1f} "
              f"{temp:8.1f} "
              f"{faults[n] / a.rounds / a.inner:8.0f}")


if __name__ == "__main__":
    main()
