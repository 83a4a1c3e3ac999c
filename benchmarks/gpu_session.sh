#!/usr/bin/env bash
# The GPU checks of issues #2 and #3 as one prepared script for a lent GPU machine
# (JAX, flax and optax preinstalled there; no tensorflow-datasets, no internet).
#
# Prepare here (git-ignored, carried with the call):
#   mkdir -p .data/mnist && cp "$MNIST_JAX_DATA_DIR"/mnist/*.gz .data/mnist/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl keras==3.15.1 namex optree tensorboardX \
#       pytest-timeout
# Run there from the repository root:
#   bash benchmarks/gpu_session.sh [bench] [recipes] [tests] [records] [record-net]
# (default: the first three; each of the last two is about one call of the device's
# 10 minutes). What it writes to $OUT: the benchmark's results files, the CNN recipe
# comparison, issue #13's figures (records.json) and logs.
set -u
SECTIONS=" ${*:-bench recipes tests} "
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
export MNIST_JAX_DATA_DIR=$PWD/.data MNIST_JAX_CACHE_DIR=/tmp/mnist-jax-cache
# The package itself (its version is recorded in results.json) and the carried wheels.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --target /tmp/site . $(ls .whl/*.whl 2>/dev/null)
export PYTHONPATH=$PWD:/tmp/site
log() { echo "=== $(date +%T) $*"; }

log versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"

if [[ $SECTIONS == *" bench "* ]]; then
log "benchmark (issue 3)"
timeout 420 python3 benchmarks/bench.py --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | grep -v '^\[bench\]'

fi

if [[ $SECTIONS == *" recipes "* ]]; then
log "CNN recipes, 12 epochs x 5 seeds (issue 2)"
for sched in constant cosine; do
  timeout 150 python3 -m mnist_jax.cli train --model cnn --epochs 12 --seeds 0,1,2,3,4 \
      --lr-schedule $sched --checkpoint-every 0 --quiet --out /tmp/runs/cnn-$sched \
      > "/tmp/runs-cnn-$sched.log" 2>&1 || { echo "cnn $sched failed"; tail -5 "/tmp/runs-cnn-$sched.log"; }
done
# (the other recipes' times to 99 % are the benchmark's own: bench.TTA_RECIPES)

python3 - "$OUT/recipes.json" <<'PY'
import json, sys, pathlib
out = {"cnn_12_epochs": {}}
for sched in ("constant", "cosine"):
    p = pathlib.Path(f"/tmp/runs/cnn-{sched}/results.json")
    if p.is_file():
        r = json.loads(p.read_text())
        out["cnn_12_epochs"][sched] = {k: r.get(k) for k in (
            "test_accuracy", "test_accuracy_mean", "test_accuracy_std", "test_loss_mean",
            "test_loss_std", "epoch_seconds", "compile_seconds", "total_seconds", "device")}
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=2))
for sched, r in out["cnn_12_epochs"].items():
    print(f"cnn 12 epochs {sched}: {r['test_accuracy']} mean {r['test_accuracy_mean']:.4f} "
          f"± {r['test_accuracy_std']:.4f}")
PY

fi

# Issue #13 on the GPU: speedrun (training <= 0.1 s per seed, 16 seeds in one program
# <= 0.5 s), best (<= 60 s per seed; 99.70 % mean, ensemble 99.78 %) and the record-scale
# net of scripts/resnet_seeds.py (the accuracy a GPU buys); runs hold out the validation
# split the recipes were judged on.
if [[ $SECTIONS == *" records "* ]]; then
log "speedrun, 1 seed and 16 seeds in one program; best, 5 seeds (issue 13)"
timeout 120 python3 -m mnist_jax.cli train --recipe speedrun --checkpoint-every 0 --quiet \
    --out /tmp/runs/speedrun-1 > /tmp/runs-speedrun-1.log 2>&1 || tail -5 /tmp/runs-speedrun-1.log
timeout 120 python3 -m mnist_jax.cli train --recipe speedrun --seeds "$(seq -s, 0 15)" \
    --checkpoint-every 0 --quiet --out /tmp/runs/speedrun-16 > /tmp/runs-speedrun-16.log 2>&1 \
    || tail -5 /tmp/runs-speedrun-16.log
timeout 300 python3 -m mnist_jax.cli train --recipe best --seeds 0,1,2,3,4 --validation-split 0.1 \
    --checkpoint-every 0 --quiet --out /tmp/runs/best > /tmp/runs-best.log 2>&1 \
    || tail -5 /tmp/runs-best.log
fi
if [[ $SECTIONS == *" record-net "* ]]; then
log "the record-scale net, 5 seeds, 10 epochs (issue 13)"
timeout 540 python3 scripts/resnet_seeds.py --net record --seeds 0,1,2,3,4 --validation-split 0.1 \
    --checkpoint-every 0 --out /tmp/runs/record-net > /tmp/runs-record-net.log 2>&1 \
    || tail -5 /tmp/runs-record-net.log
fi
if [[ $SECTIONS == *" records "* || $SECTIONS == *" record-net "* ]]; then
python3 - "$OUT/records.json" <<'PY'
import json, sys, pathlib
keys = ("test_accuracy", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_min",
        "ensemble_test_accuracy", "epoch_seconds", "compile_seconds", "total_seconds", "device")
out = {}
for name in ("speedrun-1", "speedrun-16", "best", "record-net"):
    run = pathlib.Path(f"/tmp/runs/{name}")
    if (run / "results.json").is_file():
        r = json.loads((run / "results.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[name] = {k: r.get(k) for k in keys}
        out[name]["final_val_accuracy"] = rows[-1].get("val_accuracy") if rows else None
        n = len(r["test_accuracy"]) if isinstance(r["test_accuracy"], list) else 1
        out[name]["training_seconds_per_seed"] = sum(r["epoch_seconds"]) / n
        print(name, json.dumps(out[name]))
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=2))
PY
fi

if [[ $SECTIONS == *" tests "* ]]; then
log "tests on the GPU"
timeout 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -o addopts= --timeout 120 \
    tests/test_models.py tests/test_resume.py tests/test_training.py \
    tests/test_training_failures.py > "$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"
fi
log done
