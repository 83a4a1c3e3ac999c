"""Do XLA's CPU library routes (oneDNN, XNNPACK, YNNPACK) make our training steps faster?

Issue #3 asks whether JAX can reach faster matmul kernels on the CPU (AMX through
oneDNN on CPUs that have it). XLA reads ``XLA_FLAGS`` once per process, so every
flag set runs ``benchmarks/step_variants.py`` in its own subprocess, on the same
variants (fp32 and bf16 steps of the MLP and the CNN). The baseline (no flags)
runs first, in the middle and last: the spread between its runs is the noise band
against which the other rows should be read.

    python benchmarks/xla_cpu_flags.py                    # ~5 min on 2 cores
    python benchmarks/xla_cpu_flags.py --variants mlp fast --rounds 5

Writes ``benchmarks/results/xla-cpu-flags-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import (amx_report, cpu_flags, cpu_model, device_slug,  # noqa: E402  (this folder)
                   write_result_files)

FLAG_SETS = {
    "baseline": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "XNNPACK dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "XNNPACK dot+eltwise+reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "XNNPACK graph greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "YNNPACK dot fusion": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "YNNPACK dot+eltwise+reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
}
VARIANTS = ["mlp", "mlp-bf16", "fast", "fast-bf16"]


def run_variants(flags: str, variants: list[str], rounds: int) -> dict:
    """ms/step of each variant with ``XLA_FLAGS=flags``, or the error it ended with."""
    env = dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_variants.py"), *variants,
           "--rounds", str(rounds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in variants and len(parts) >= 3:
            rows[parts[0]] = float(parts[1])
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"error": f"exit {proc.returncode}: {' '.join(tail)}"[:300]}
    return {"ms_per_step": rows}


def markdown(results: dict) -> str:
    variants = results["variants"]
    out = [f"# XLA CPU library routes: {results['device']}", "",
           f"Measured {results['date']} with `python benchmarks/xla_cpu_flags.py`: ms per "
           f"training step (batch 128, Adam), median of {results['rounds']} rounds, each flag "
           "set in its own process. 'fast' is the CNN's default CPU path. "
           f"{results['amx']['note']}", "",
           "| flags | XLA_FLAGS | " + " | ".join(variants) + " |",
           "|---|---|" + "---|" * len(variants)]
    for row in results["runs"]:
        ms = row.get("ms_per_step", {})
        cells = [f"{ms[v]:.2f}" if v in ms else "-" for v in variants]
        flags = f"`{row['xla_flags']}`" if row["xla_flags"] else "(none)"
        out.append(f"| {row['name']} | {flags} | " + " | ".join(cells) + " |"
                   + (f" {row['error']}" if "error" in row else ""))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    import jax
    dev = jax.devices()[0]
    results = {"device": device_slug(dev.platform, cpu_model(), jax.device_count(), os.cpu_count()),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "jax": jax.__version__,
               "rounds": a.rounds, "variants": a.variants, "amx": amx_report(cpu_flags()),
               "runs": []}
    # The baseline again in the middle and at the end: this shared VM has slow spells.
    items = list(FLAG_SETS.items())
    half = len(items) // 2 + 1
    order = items[:half] + [("baseline (2)", "")] + items[half:] + [("baseline (3)", "")]
    for name, flags in order:
        print(f"[xla_cpu_flags] {name}: {flags or '(none)'}", file=sys.stderr, flush=True)
        results["runs"].append(dict({"name": name, "xla_flags": flags},
                                    **run_variants(flags, a.variants, a.rounds)))
    write_result_files(a.out, "xla-cpu-flags", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
