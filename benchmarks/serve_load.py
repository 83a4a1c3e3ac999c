"""``mnist-jax serve`` under load: batched requests vs one request at a time, same server.

One server (:func:`mnist_jax.serve.start_server`, on 127.0.0.1, port chosen by the system)
serves a run from a thread of this process. A separate client process opens ``--clients``
keep-alive connections (asyncio tasks, each request's bytes built once) and posts the same
digit again and again: a photo-like PNG of a real MNIST test digit (``--body png``: the
full ``mnist-jax predict`` preprocessing per request) or its 28x28 ``{"pixels"}`` JSON
(``--body json``). Between
client runs the server's predictor switches between

* ``batched``: requests that arrive together share one compiled call (the default), and
* ``one-at-a-time``: every request is its own compiled call of batch size 1,

in ``--rounds`` interleaved rounds (order alternating) of ``--seconds / --rounds`` seconds
each, so a busy shared machine slows both alike; each mode gets ``--seconds`` in all after an
unrecorded warm-up. Reported per mode: requests per second, p50/p99 latency, errors (any
non-200 answer or failed connection), and the server's mean batch size.

Without ``--run`` an MLP is trained for one epoch on real MNIST first (``$MNIST_JAX_DATA_DIR``).
Writes ``benchmarks/results/serve_load-<device>.json`` and ``.md``.

    MNIST_JAX_DATA_DIR=... python benchmarks/serve_load.py --run runs/mlp-mnist --body png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODES = ("batched", "one-at-a-time")


# ---------------------------------------------------------------------------------------
# the client process
# ---------------------------------------------------------------------------------------
def client_main(url: str, body_path: str, content_type: str, clients: int,
                seconds: float, expect: int = 200) -> dict:
    """``clients`` keep-alive connections, each posting ``body`` again and again for
    ``seconds`` (one asyncio task per connection, the request's bytes built once, so the
    load generator leaves the shared cores to the server); returns every latency (s), the
    errors (answers other than ``expect``, failed connections) and the wall time."""
    import asyncio
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = Path(body_path).read_bytes()
    request = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
               f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[str] = []

    async def exchange(reader, writer) -> tuple[int, bytes]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        return status, await reader.readexactly(length)

    async def worker(stop_at: float) -> None:
        conn = None
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                status, answer = await asyncio.wait_for(exchange(*conn), 30)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if status != expect or (expect == 200 and b'"class"' not in answer):
                errors.append(f"{status} {answer[:80]!r}")
                continue
            latencies.append(time.perf_counter() - t)
        if conn is not None:
            conn[1].close()

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    return {"latencies": latencies, "errors": errors, "wall_s": wall}


def run_clients(url: str, body_path: Path, content_type: str, clients: int,
                seconds: float, expect: int = 200) -> dict:
    """:func:`client_main` in a fresh process (it must not share the server's GIL)."""
    cmd = [sys.executable, __file__, "--client", url, str(body_path), content_type,
           str(clients), str(seconds), str(expect)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         timeout=seconds + 120).stdout
    return json.loads(out)


# ---------------------------------------------------------------------------------------
# the server side
# ---------------------------------------------------------------------------------------
def make_body(kind: str, folder: Path) -> tuple[Path, str]:
    """The request body every client sends: a real test digit as a photo or as pixels."""
    import numpy as np

    import mnist_jax as mj
    from mnist_jax.images import render_like_photo
    ds = mj.load_dataset("mnist", os.environ.get("MNIST_JAX_DATA_DIR"))
    digit = ds.test_images[0]
    if kind == "json":
        path = folder / "digit.json"
        path.write_text(json.dumps({"pixels": digit.tolist()}))
        return path, "application/json"
    buf = io.BytesIO()
    render_like_photo(digit, np.random.default_rng(0), size=160).save(buf, format="PNG")
    path = folder / "digit.png"
    path.write_bytes(buf.getvalue())
    return path, "image/png"


def train_default_run(folder: Path) -> Path:
    from mnist_jax import cli
    run = folder / "mlp-mnist"
    if cli.main(["train", "--out", str(run), "--epochs", "1", "--quiet"]) != 0:
        raise SystemExit("training the MLP failed")
    return run


def summarize(results: list[dict]) -> dict:
    lat = sorted(x for r in results for x in r["latencies"])
    wall = sum(r["wall_s"] for r in results)
    errors = [e for r in results for e in r["errors"]]

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")

    return {"requests": len(lat), "errors": len(errors), "error_examples": errors[:5],
            "seconds": wall, "req_per_s": len(lat) / wall if wall else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan")}


def model_only(predictor, rounds: int, seconds: float = 1.0) -> dict[str, float]:
    """Images per second through the compiled calls alone, no HTTP: batch 1 against the
    largest batch size, interleaved; the ceiling of what batching can gain."""
    import numpy as np
    big = predictor.batch_sizes[-1]
    images = np.zeros((big, 28, 28), np.uint8)
    rates: dict[int, list[float]] = {1: [], big: []}
    for i in range(rounds):
        for size in ((1, big) if i % 2 == 0 else (big, 1)):
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                predictor.predict_now(images[:size])
                done += size
            rates[size].append(done / (time.perf_counter() - t0))
    return {f"batch_{size}_images_per_s": statistics.median(r) for size, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run folder to serve (default: train an MLP for 1 epoch)")
    parser.add_argument("--body", choices=("png", "json"), default="png",
                        help="what the clients send (default png: the photo path)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="measured seconds per mode, over all rounds (default 20)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per mode, unrecorded")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--tag", default="", help="added to the results' file names")
    args = parser.parse_args(argv)

    import jax

    from bench_harness import cpu_model, device_slug
    from mnist_jax import serve
    from mnist_jax.rundir import git_commit, library_versions

    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = Path(args.run) if args.run else train_default_run(scratch)
    body_path, content_type = make_body(args.body, scratch)
    per_round = args.seconds / args.rounds
    measured: dict[str, list[dict]] = {m: [] for m in MODES}
    stats: dict[str, dict[str, int]] = {m: {"calls": 0, "images": 0, "computed": 0}
                                        for m in MODES}
    loads = []
    with serve.start_server(run) as server:
        for mode in MODES:  # warm-up: connections, threads, caches; not recorded
            server.predictor.batching = mode == "batched"
            run_clients(server.url, body_path, content_type, args.clients, args.warmup)
        for i in range(args.rounds):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                server.predictor.batching = mode == "batched"
                before = dict(server.predictor.stats)
                r = run_clients(server.url, body_path, content_type, args.clients, per_round)
                after = server.predictor.stats
                for k in ("calls", "images"):
                    stats[mode][k] += after[k] - before.get(k, 0)
                # images the compiled calls computed, padding included (size_N: calls of N)
                stats[mode]["computed"] += sum(int(k[5:]) * (after[k] - before.get(k, 0))
                                               for k in after if k.startswith("size_"))
                measured[mode].append(r)
                loads.append(os.getloadavg()[0])
                s = summarize([r])
                print(f"round {i + 1} {mode:13s} {s['req_per_s']:8.1f} req/s  p50 "
                      f"{s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms  errors {s['errors']}",
                      flush=True)
        info = server.info
        compiled = model_only(server.predictor, args.rounds)
        # the HTTP exchange alone: the same clients and body, answered 415 at once
        floor = summarize([run_clients(server.url, body_path, "text/plain", args.clients,
                                       per_round, expect=415)])

    summary = {m: dict(summarize(rs), mean_batch=stats[m]["images"] / max(1, stats[m]["calls"]),
                       computed_per_request=stats[m]["computed"] / max(1, stats[m]["images"]))
               for m, rs in measured.items()}
    ratio = summary["batched"]["req_per_s"] / max(1e-9, summary["one-at-a-time"]["req_per_s"])
    dev = jax.devices()[0]
    kind = cpu_model() if dev.platform == "cpu" else getattr(dev, "device_kind", str(dev))
    slug = device_slug(dev.platform, kind, jax.device_count())
    name = f"serve_load-{slug}{'-' + args.tag if args.tag else ''}"
    record = {"benchmark": "serve_load", "run": str(run), "model": info.model,
              "body": args.body, "clients": args.clients, "seconds_per_mode": args.seconds,
              "rounds": args.rounds, "batch_sizes": list(serve.BATCH_SIZES),
              "max_wait_s": serve.DEFAULT_MAX_WAIT, "summary": summary,
              "batched_vs_one_at_a_time": ratio, "model_only": compiled,
              "http_only_415": floor, "device": slug,
              "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_during": loads,
              "platform": platform.platform(), "versions": library_versions(),
              "git_commit": git_commit(), "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from mnist_jax.atomic import write_atomic
    write_atomic(out / f"{name}.json", json.dumps(record, indent=2) + "\n")
    body = ("a photo-like PNG digit (the full predict preprocessing)" if args.body == "png"
            else "a digit's 28x28 pixels as JSON")
    lines = [f"# mnist-jax serve under load ({slug})", "",
             f"{args.clients} clients on 127.0.0.1, keep-alive, posting {body}"
             f" to one server serving `{info.model}` ({info.served}); {args.seconds:g} s per "
             f"mode in {args.rounds} interleaved rounds; CPU {cpu_model()}, {os.cpu_count()} "
             f"cores, load average during {min(loads):.1f}-{max(loads):.1f}.", "",
             *([f"Other work shared the machine (load average above its {os.cpu_count()} "
                "cores): the figures are noisy, the ratio within one run is the measure.", ""]
               if max(loads) > (os.cpu_count() or 1) else []),
             "| mode | req/s | p50 (ms) | p99 (ms) | errors | mean batch | images computed "
             "per request (padding) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['req_per_s']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                     f"{s['errors']} | {s['mean_batch']:.1f} | "
                     f"{s['computed_per_request']:.2f} |")
    one, big = compiled.values()
    lines += ["", f"Batched vs one at a time: x{ratio:.2f} the requests per second.", "",
              f"The compiled calls alone (no HTTP, same process, interleaved): {one:.0f} images/s "
              f"one at a time, {big:.0f} images/s in batches of {serve.BATCH_SIZES[-1]} "
              f"(x{big / one:.1f}).", "",
              f"The HTTP exchange alone (same clients and body, answered 415 without reading "
              f"it, {per_round:g} s): {floor['req_per_s']:.0f} req/s, p50 {floor['p50_ms']:.1f} "
              f"ms, errors {floor['errors']}.", "",
              f"Command: `python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`"]
    write_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["errors"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, body, ctype, n, secs, expect = sys.argv[2:8]
        print(json.dumps(client_main(url, body, ctype, int(n), float(secs), int(expect))))
        sys.exit(0)
    sys.exit(main())
