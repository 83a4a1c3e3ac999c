"""Run the mnist-jax benchmark suite (same as ``mnist-jax bench``).

    python benchmarks/run_benchmarks.py            # full run, writes benchmarks/results/<device>.{json,md}
    python benchmarks/run_benchmarks.py --quick    # CI-sized smoke run (<device>-quick.*)
    python benchmarks/run_benchmarks.py --help

The logic lives in :mod:`mnist_jax.bench`. Keras 3 and PyTorch are optional
(``pip install -e .[bench]`` for Keras, ``pip install torch`` for PyTorch); a
missing one is reported as "missing".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mnist_jax import bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run_benchmarks.py",
                                     description=bench.__doc__.split("\n")[0])
    bench.add_arguments(parser)
    return bench.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
