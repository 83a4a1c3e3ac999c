"""Images/s of this project's compiled training epoch against the device count.

Each device count runs in a fresh subprocess (on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; on a GPU/TPU machine on
its first N real devices), builds the 1-D ``data`` mesh, replicates the train
state and the uint8 data, compiles ``training.train_epoch`` with the batch
sharded over the mesh and times whole epochs (median), after one warm-up epoch.

    python benchmarks/scaling.py                          # MLP 3 epochs, CNN 1 epoch
    python benchmarks/scaling.py --counts 1,2 --cnn-train 12800

Writes ``benchmarks/results/scaling-<device>.json`` and ``.md``.

Forced CPU devices all share the host's cores (XLA:CPU runs each device's
part on the same thread pool), so on CPU this measures the *cost* of sharding
(collectives, smaller per-device matmuls), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model: str, devices: int, epochs: int, train: int, batch: int) -> dict:
    """Run in the subprocess: time `epochs` epochs on `devices` devices."""
    import jax
    import numpy as np

    from mnist_jax import data as data_lib
    from mnist_jax import parallel
    from mnist_jax.config import TrainConfig
    from mnist_jax.run import init_state
    from mnist_jax.training import compile_fns

    try:
        ds = data_lib.load_dataset("mnist")
        images, labels, source = ds.train_images[:train], ds.train_labels[:train], "mnist"
    except Exception:  # noqa: BLE001 - no data here: synthetic images of the same shape
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (train, 28, 28), dtype=np.uint8)
        labels, source = rng.integers(0, 10, train), "synthetic"
    config = TrainConfig(model=model, batch_size=batch, devices=devices)
    mesh = parallel.make_data_mesh(devices)
    parallel.check_batch_size(batch, mesh)
    state = parallel.replicate(init_state(config), mesh)
    x = parallel.replicate(np.asarray(images), mesh)
    y = parallel.replicate(np.asarray(labels, np.int32), mesh)
    fns = compile_fns(batch, 1, parallel.batch_sharding(mesh) if devices > 1 else None)
    t = time.perf_counter()
    epoch = fns.train_epoch.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t
    state, m = epoch(state, x, y)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        state, m = epoch(state, x, y)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    steps = len(images) // batch
    med = sorted(times)[len(times) // 2]
    d = jax.devices()[0]
    return {"model": model, "devices": devices, "device_kind": d.device_kind,
            "platform": d.platform, "batch_size": batch, "steps_per_epoch": steps,
            "train_examples": len(images), "data": source, "compile_seconds": compile_s,
            "epoch_seconds": times, "median_epoch_seconds": med,
            "images_per_second": steps * batch / med, "final_loss": float(m.loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--mlp-epochs", type=int, default=3)
    ap.add_argument("--cnn-epochs", type=int, default=1)
    ap.add_argument("--mlp-train", type=int, default=60000)
    ap.add_argument("--cnn-train", type=int, default=12800, help="CNN subset (CPU time)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=5, metavar=("MODEL", "N", "EPOCHS", "TRAIN", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, n, e, tr, b = args.child
        print("RESULT " + json.dumps(child(m, int(n), int(e), int(tr), int(b))), flush=True)
        return

    import jax  # only to learn what the parent sees (no work done here)
    backend = jax.default_backend()
    real = jax.device_count()
    rows = []
    for model in args.models.split(","):
        epochs = args.mlp_epochs if model == "mlp" else args.cnn_epochs
        train = args.mlp_train if model == "mlp" else args.cnn_train
        for n in [int(c) for c in args.counts.split(",")]:
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3")
            if backend == "cpu":
                flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
            elif n > real:
                print(f"skip {model} x{n}: only {real} devices")
                continue
            r = subprocess.run([sys.executable, __file__, "--child", model, str(n), str(epochs),
                                str(train), str(args.batch_size)],
                               env=env, capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{model} x{n} failed:\n{r.stderr[-2000:]}")
                continue
            row = json.loads(line[0][7:])
            rows.append(row)
            print(f"{model} {n} device(s): {row['images_per_second']:,.0f} images/s "
                  f"(median epoch {row['median_epoch_seconds']:.2f} s, compile "
                  f"{row['compile_seconds']:.1f} s)", flush=True)
    if not rows:
        sys.exit("no results")
    kind = rows[0]["device_kind"] if backend != "cpu" else "cpu"
    name = kind.lower().replace(" ", "-")
    note = ("Forced CPU devices share this host's "
            f"{os.cpu_count()} cores: more devices cannot be faster here; the numbers show "
            "the overhead of splitting the batch and all-reducing the gradient."
            if backend == "cpu" else f"{real} real {kind} device(s).")
    meta = {"backend": backend, "device": kind, "host_cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "note": note,
            "load_average_at_end": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scaling-{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                              + "\n")
    lines = [f"# Data-parallel scaling: {kind}", "", note, "",
             f"jax {jax.__version__}, batch {args.batch_size} (global), host load average at "
             f"the end {meta['load_average_at_end'][0]:.1f}.", "",
             "| model | devices | per-device batch | train images | images/s | "
             "vs 1 device | median epoch s | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r["images_per_second"] for r in rows if r["devices"] == 1}
    for r in rows:
        rel = r["images_per_second"] / base[r["model"]] if r["model"] in base else float("nan")
        lines.append(f"| {r['model']} | {r['devices']} | {r['batch_size'] // r['devices']} | "
                     f"{r['train_examples']} | {r['images_per_second']:,.0f} | {rel:.2f}x | "
                     f"{r['median_epoch_seconds']:.2f} | {r['compile_seconds']:.1f} |")
    (out / f"scaling-{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'scaling-{name}.json'} and .md")


if __name__ == "__main__":
    main()
