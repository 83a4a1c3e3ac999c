"""The peers of ``mnist-jax bench``: Keras 3 (JAX backend) and PyTorch eager twins of
the benchmarked models, each trained in a child process of its own (Keras' backend is fixed
at import, and neither may share jit caches or thread pools with mnist-jax)."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any

from bench_harness import (ADAM_EPS, BATCH_SIZE, LEARNING_RATE, measured_epochs, median, missing,
                           run_child)


PEERS = ("keras", "torch")
PEER_TITLES = {"ours": "mnist-jax", "keras": "Keras 3 (JAX backend)", "torch": "PyTorch eager"}
# Importable module of each peer; a peer whose module is not installed is "missing".
PEER_MODULES = {"keras": "keras", "torch": "torch"}


def peer_available(peer: str) -> bool:
    """Whether the peer's framework can be imported (without importing it)."""
    module = PEER_MODULES[peer]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_peer(peer: str, model_name: str, *, epochs: int, steps: int | None, data_dir: str | None,
             synthetic: bool, timeout: float, accelerator: bool = False) -> dict[str, Any]:
    """Time ``peer`` training ``model_name`` in a subprocess; "missing" if not installed.
    ``accelerator``: run it on the GPU (PyTorch: CUDA; Keras: JAX's default device)."""
    if not peer_available(peer):
        return missing(f"{PEER_MODULES[peer]} is not installed")
    task = {"kind": peer, "model": model_name, "epochs": epochs, "steps": steps,
            "data_dir": data_dir, "synthetic": synthetic, "accelerator": accelerator}
    env = {"KERAS_BACKEND": "jax"} if peer == "keras" else None
    return run_child(task, timeout, env)


def _peer_summary(epoch_seconds: list[float], steps: int, full_steps: int, images: int,
                  scaled: bool, eval_seconds: float | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A peer's result; ``images`` is what one full epoch of it processes."""
    secs = measured_epochs(epoch_seconds)
    per = median(secs)
    epoch_s = per * full_steps / steps if scaled else per
    how = (f"{len(secs)} x {steps} steps after a warm-up, scaled to {full_steps} steps"
           if scaled else f"{len(secs)} epochs after 1 warm-up")
    return dict({"status": "ok", "epoch_seconds_median": epoch_s, "raw_epoch_seconds": epoch_seconds,
                 "steps_timed": steps, "scaled_to_full_epoch": scaled, "images_per_epoch": images,
                 "images_per_second": images / epoch_s, "eval_seconds": eval_seconds,
                 "measured": how}, **extra)


def keras_model(name: str):
    """The Keras 3 twin of ``models.create_model(name)`` (softmax output, as Keras has it)."""
    import keras
    from keras import layers
    shape = (784,) if name == "mlp" else (28, 28, 1)
    return keras.Sequential([keras.Input(shape), *{
        "cnn": lambda: [
            layers.Conv2D(32, 3, activation="relu"), layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2), layers.Dropout(0.25), layers.Flatten(),
            layers.Dense(128, activation="relu"), layers.Dropout(0.5),
            layers.Dense(10, activation="softmax")],
        "convnet": lambda: [  # keras.io's "Simple MNIST convnet", layer for layer
            layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
            layers.Dropout(0.5), layers.Dense(10, activation="softmax")],
        "mlp": lambda: [
            layers.Dense(784), layers.Dropout(0.4), layers.Activation("relu"),
            layers.Dense(10, activation="softmax")],
    }[name]()])


def torch_model(name: str):
    """The PyTorch twin of ``models.create_model(name)`` (logits, NCHW input)."""
    from torch import nn
    return nn.Sequential(*{
        "cnn": lambda: [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
                        nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)],
        "convnet": lambda: [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Dropout(0.5), nn.Linear(1600, 10)],
        "mlp": lambda: [nn.Linear(784, 784), nn.Dropout(0.4), nn.ReLU(), nn.Linear(784, 10)],
    }[name]())


def child_keras(task: dict[str, Any], ds) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    cnn = task["model"] != "mlp"
    shape = (28, 28, 1) if cnn else (784,)
    x = (ds.train_images.astype(np.float32) / 255.0).reshape(-1, *shape)
    y = ds.train_labels.astype(np.int32)
    xt = (ds.test_images.astype(np.float32) / 255.0).reshape(-1, *shape)
    yt = ds.test_labels.astype(np.int32)
    model = keras_model(task["model"])
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE, epsilon=ADAM_EPS),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    full_steps, full_images = math.ceil(len(x) / BATCH_SIZE), len(x)
    steps = task.get("steps")
    scaled = bool(steps) and steps < full_steps
    if scaled:
        x, y = x[: steps * BATCH_SIZE], y[: steps * BATCH_SIZE]
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=BATCH_SIZE, epochs=task["epochs"], shuffle=True, verbose=0,
              callbacks=[Timer()])
    eval_times = []
    for _ in range(3 if not cnn else 2):
        t = time.perf_counter()
        _, acc = model.evaluate(xt, yt, batch_size=1000, verbose=0)
        eval_times.append(time.perf_counter() - t)
    return _peer_summary(times, steps if scaled else full_steps, full_steps, full_images, scaled,
                         median(eval_times[1:]),
                         {"first_epoch_seconds": times[0],
                          "keras": keras.__version__, "backend": keras.backend.backend(),
                          "test_accuracy": float(acc),
                          "eval_note": "model.evaluate, batch 1000, median after a warm-up call"})


def child_torch(task: dict[str, Any], ds) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    # On a GPU: data and model on it, fp32 matmuls in tf32 as JAX's default precision does there.
    dev = torch.device("cuda" if task.get("accelerator") and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cnn = task["model"] != "mlp"
    shape = (1, 28, 28) if cnn else (784,)
    x = torch.from_numpy(ds.train_images.astype(np.float32) / 255.0).reshape(-1, *shape).to(dev)
    y = torch.from_numpy(ds.train_labels.astype(np.int64)).to(dev)
    xt = torch.from_numpy(ds.test_images.astype(np.float32) / 255.0).reshape(-1, *shape).to(dev)
    yt = torch.from_numpy(ds.test_labels.astype(np.int64)).to(dev)
    model = torch_model(task["model"])
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, eps=ADAM_EPS)
    loss_fn = nn.CrossEntropyLoss()
    full_steps = len(x) // BATCH_SIZE  # drop the last partial batch, as mnist-jax does
    steps = min(task.get("steps") or full_steps, full_steps)
    times = []
    for _ in range(task["epochs"]):
        t = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), device=dev)
        for i in range(steps):
            idx = perm[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sync()
        times.append(time.perf_counter() - t)
    model.eval()
    eval_times = []
    for _ in range(3 if not cnn else 2):
        t = time.perf_counter()
        with torch.no_grad():
            correct = sum(int((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum())
                          for i in range(0, len(xt), 1000))
        eval_times.append(time.perf_counter() - t)
    return _peer_summary(times, steps, full_steps, full_steps * BATCH_SIZE, steps < full_steps,
                         median(eval_times[1:]),
                         {"first_epoch_seconds": times[0],
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "torch_device": str(dev),
                          "test_accuracy": correct / len(xt),
                          "eval_note": "no_grad forward, batch 1000, median after a warm-up pass"})
