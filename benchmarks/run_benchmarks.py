"""Run the mnist-jax benchmark suite (same as ``mnist-jax bench`` and ``python benchmarks/bench.py``).

    python benchmarks/run_benchmarks.py            # full run, writes benchmarks/results/<device>.{json,md}
    python benchmarks/run_benchmarks.py --quick    # CI-sized smoke run (<device>-quick.*)
    python benchmarks/run_benchmarks.py --help

The logic lives in ``benchmarks/bench.py``. Keras 3 and PyTorch are optional
(``pip install -e .[bench]`` for Keras, ``pip install torch`` for PyTorch); a
missing one is reported as "missing".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bench  # noqa: E402  (this script's own folder is on sys.path)


if __name__ == "__main__":
    sys.exit(bench.main(prog="run_benchmarks.py"))
