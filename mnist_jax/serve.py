"""``mnist-jax serve``: a draw-a-digit page and a JSON API over a trained run.

Three parts, edge to core:

* :func:`serve` (the CLI) binds the socket, prints ``serving RUN_DIR at http://HOST:PORT``
  once the server accepts connections, and stops cleanly on Ctrl-C; :func:`start_server`
  runs the same server in a background thread (tests, benchmarks).
* :func:`create_app`, a Starlette app: ``GET /`` the page (``static/draw.html``, one
  self-contained file), ``GET /health``, ``POST /predict`` with an image body (``image/*``)
  or ``{"pixels": 28x28}`` JSON. Images go through :func:`mnist_jax.images.load_image`, the
  very function ``mnist-jax predict`` uses, so both answer the same. Every bad request is a
  4xx with ``{"error": "one line"}``; bodies over ``max_body`` are refused from their
  ``Content-Length`` (or as soon as a streamed body passes it), never read whole.
* :class:`Predictor`, the batcher: requests queue up, one worker thread takes what has
  arrived (waiting ``max_wait`` seconds for more) and runs it as ONE call of a program
  compiled ahead of time for a few fixed batch sizes, so nothing compiles while serving.
  It reaches the model only through the run's state and ``predict_probs``
  (``state.apply_fn``), so any model a run can hold serves.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import functools
import io
import ipaddress
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
# The serve extra, imported here so that a missing one fails at import (the CLI says which
# extra to install), not after the run is loaded and compiled.
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mnist_jax.errors import DataError, UsageError

__all__ = ["BATCH_SIZES", "DEFAULT_MAX_BODY", "Predictor", "RunInfo", "ServerHandle",
           "create_app", "decode_image", "parse_pixels", "serve", "start_server"]

BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes compiled at start-up; n waiting requests run as the largest size <= n."""
DEFAULT_MAX_BODY = 10_000_000
"""Largest request body accepted (bytes); larger ones are answered 413."""
DEFAULT_MAX_WAIT = 0.002
"""Seconds the batcher waits after a request for others to join its batch: long enough
for requests sent together to meet, short beside a compiled call."""
_QUEUE_LIMIT = 4096  # requests waiting beyond this are refused (503): bounded memory
_FIELD = 28
_INLINE_JSON = 65_536  # a 28x28 pixels object is ~10 KB: parsed in the event loop, where a
# hop to a worker thread would cost more than the parse; larger bodies do not block the loop


class BadRequest(Exception):
    """A request the server refuses: ``status`` and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(" ".join(str(message).split()))
        self.status = status


# ---------------------------------------------------------------------------------------
# Request bodies → 28x28 uint8 images
# ---------------------------------------------------------------------------------------
def decode_image(body: bytes, scratch: str | Path | None = None) -> np.ndarray:
    """An image file's bytes → its (28, 28) uint8 MNIST form, as ``mnist-jax predict`` makes it.

    The bytes are written to a private file in ``scratch`` and read by
    :func:`mnist_jax.images.load_image` itself: the same decoding, decompression-bomb
    limits and :func:`~mnist_jax.images.to_mnist`. Raises :class:`BadRequest` (400) with
    load_image's one-line reason, without the scratch file's name.
    """
    if not body:
        raise BadRequest("empty body: send the image file's bytes")
    from mnist_jax.images import load_image
    fd, name = tempfile.mkstemp(dir=scratch, prefix="upload-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return load_image(name)
    except DataError as e:
        raise BadRequest(str(e).replace(f"{name}: ", "").replace(name, "image")) from None
    finally:
        os.unlink(name)


def parse_pixels(body: bytes) -> np.ndarray:
    """``{"pixels": [[28 numbers] x 28]}`` (0-255, white ink on black) → (28, 28) uint8.

    Values are rounded to the nearest integer. Raises :class:`BadRequest` (400) for
    anything else: invalid JSON, another shape, a value that is not a number in [0, 255].
    """
    if not body:
        raise BadRequest('empty body: send {"pixels": [[28 numbers 0-255] x 28 rows]}')
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict) or "pixels" not in obj:
        raise BadRequest('expected a JSON object {"pixels": [[28 numbers 0-255] x 28 rows]}')
    rows = obj["pixels"]
    if not (isinstance(rows, list) and len(rows) == _FIELD
            and all(isinstance(r, list) and len(r) == _FIELD for r in rows)):
        raise BadRequest(f"pixels must be {_FIELD} rows of {_FIELD} numbers")
    # numbers only (bool is an int in Python); one pass in C, then the range in numpy
    if set(map(type, itertools.chain.from_iterable(rows))) <= {int, float}:
        try:
            pixels = np.array(rows, np.float64)
        except OverflowError:  # an integer too large for a float
            pixels = None
        # NaN fails both comparisons, 1e999 is inf
        if pixels is not None and ((pixels >= 0) & (pixels <= 255)).all():
            return np.round(pixels).astype(np.uint8)
    bad = next(v for v in itertools.chain.from_iterable(rows)
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 255)
    raise BadRequest(f"pixels must be numbers from 0 to 255, got {json.dumps(bad)[:40]}")


def png_data_url(image: np.ndarray) -> str:
    """A uint8 grayscale image as a ``data:image/png;base64,...`` URL."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")  # 2-D uint8: mode L
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------
# The batching predictor
# ---------------------------------------------------------------------------------------
def _probs_fn(batch_size: int, stacked: bool) -> Callable:
    """``(state, uint8 images (batch_size, 28, 28)) → probabilities (batch_size, 10)``:
    one model's softmax, or the mean of a stacked state's models' (the ensemble)."""
    from mnist_jax.training import default_model_axis, over_models, predict_probs
    one = functools.partial(predict_probs, batch_size=batch_size)
    if not stacked:
        return one
    every = over_models(one, 1, default_model_axis())
    return lambda state, images: every(state, images).mean(axis=0)


class Predictor:
    """Class probabilities for single images, computed in batches by one worker thread.

    ``submit(image)`` queues a (28, 28) uint8 image and returns a future of its (10,)
    float32 probabilities. The worker takes the oldest request and, while ``batching`` is
    on, every request that has arrived or arrives within ``max_wait`` seconds (up to the
    largest batch size), and runs as many of them as the largest of ``batch_sizes`` they
    fill, in one call of the program compiled for it: no image is computed for nothing.
    The newest that did not fit wait for the next call, with those that arrive meanwhile
    (the calls a stream of requests makes are full, and a lone request is one call of 1).
    With ``batching`` off it runs each request alone (the benchmark's baseline). All programs
    are compiled in the constructor, so serving never compiles. ``stats`` counts calls,
    images and the sizes used.
    """

    def __init__(self, state: Any, *, stacked: bool = False,
                 batch_sizes: tuple[int, ...] = BATCH_SIZES, max_wait: float = DEFAULT_MAX_WAIT):
        import jax
        import jax.numpy as jnp

        from mnist_jax.training import loop_emitter_options
        if not batch_sizes or min(batch_sizes) < 1:
            raise UsageError(f"batch sizes must be positive, got {batch_sizes}")
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        if self.batch_sizes[0] != 1:
            raise UsageError("the batch sizes must include 1 (a request alone)")
        self.max_wait = max_wait
        self.batching = True
        self.state = jax.device_put(state)
        self._compiled = {
            b: jax.jit(_probs_fn(b, stacked), compiler_options=loop_emitter_options())
            .lower(self.state, jax.ShapeDtypeStruct((b, _FIELD, _FIELD), jnp.uint8)).compile()
            for b in self.batch_sizes}
        self.stats: Counter[str] = Counter()
        self._queue: queue.Queue = queue.Queue(_QUEUE_LIMIT)
        self._thread: threading.Thread | None = None

    # -- the caller's side ------------------------------------------------------------------
    def start(self) -> "Predictor":
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mnist-jax-predictor",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the requests queued so far, then end the worker thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, image: np.ndarray) -> concurrent.futures.Future:
        """Queue one (28, 28) uint8 image; the future gives its (10,) probabilities."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((np.asarray(image, np.uint8), future))
        except queue.Full:
            raise BadRequest("the server is overloaded; try again", status=503) from None
        return future

    def predict_now(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (n, 10) for n <= max(batch_sizes) images, in this thread."""
        n = len(images)
        size = next(b for b in self.batch_sizes if b >= n)
        batch = np.zeros((size, _FIELD, _FIELD), np.uint8)
        batch[:n] = images
        probs = np.asarray(self._compiled[size](self.state, batch))[:n]
        self.stats.update(calls=1, images=n, **{f"size_{size}": 1})
        return probs

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        carry: list = []  # requests taken but not yet run, oldest first
        stop = False
        while carry or not stop:
            items = self._take(carry) if not stop else carry
            stop = stop or items[-1] is None
            items = [it for it in items if it is not None]
            fill = len(items) if self.batching else 1
            size = max(b for b in self.batch_sizes if b <= max(fill, 1))
            carry = items[size:]
            if items:
                self._run(items[:size])

    def _take(self, carry: list) -> list:
        """``carry``, else the oldest request; with batching, every other that joins
        within max_wait (up to the largest batch size); carried requests have waited
        already, so with them only those queued by now join."""
        import time
        items = carry or [self._queue.get()]
        if not self.batching or items[-1] is None:
            return items
        deadline = time.monotonic() + (0.0 if carry else self.max_wait)
        while len(items) < self.batch_sizes[-1]:
            remaining = deadline - time.monotonic()
            try:
                item = (self._queue.get_nowait() if remaining <= 0
                        else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
            items.append(item)
            if item is None:
                break
        return items

    def _run(self, items: list) -> None:
        # a request whose client went away may be cancelled: skip it (setting a cancelled
        # future's result raises, and would end this thread)
        items = [(img, f) for img, f in items if f.set_running_or_notify_cancel()]
        if not items:
            return
        futures = [f for _, f in items]
        try:
            probs = self.predict_now(np.stack([img for img, _ in items]))
        except Exception as e:  # noqa: BLE001 - every waiting request learns of it
            for f in futures:
                f.set_exception(e)
            return
        for f, p in zip(futures, probs):
            f.set_result(p)


# ---------------------------------------------------------------------------------------
# The run being served
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What ``/health`` and the page's corner say about the served run."""

    run: str
    model: str
    served: str
    test_accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"status": "ok", **dataclasses.asdict(self)}


def load_predictor(run_dir: str | Path, *, model_index: int | None = None,
                   ensemble: bool = False, max_wait: float = DEFAULT_MAX_WAIT
                   ) -> tuple[Predictor, RunInfo]:
    """Read a finished run and compile its predictor: model ``model_index`` (default 0)
    or, with ``ensemble``, the mean of all its models' probabilities."""
    from mnist_jax.lifecycle import load_run
    from mnist_jax.run import model_name

    loaded = load_run(run_dir)
    n = loaded.config.num_models
    if ensemble and model_index is not None:
        raise UsageError("--ensemble serves every model: give it or --model-index, not both")
    if ensemble and n == 1:
        raise UsageError(f"--ensemble: {loaded.run.path} trained one model")
    index = model_index or 0
    if not 0 <= index < n:
        raise UsageError(f"invalid --model-index {index}: {loaded.run.path} trained {n} "
                         f"model(s), 0 to {n - 1}")
    results = loaded.run.read_results() or {}
    if ensemble:
        predictor = Predictor(loaded.state, stacked=True, max_wait=max_wait)
        served, acc = f"ensemble of {n} models", results.get("ensemble_test_accuracy")
    else:
        predictor = Predictor(loaded.model_state(index), max_wait=max_wait)
        acc = results.get("test_accuracy")
        acc = acc[index] if isinstance(acc, list) and len(acc) == n else acc
        served = "model 0" if n == 1 else f"model {index} of {n}"
    info = RunInfo(Path(loaded.run.path).name, model_name(loaded.config), served,
                   float(acc) if isinstance(acc, (int, float)) else None)
    return predictor, info


# ---------------------------------------------------------------------------------------
# The web app
# ---------------------------------------------------------------------------------------
_PAGE_POLICY = ("default-src 'none'; connect-src 'self'; img-src 'self' data: blob:; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; "
                "form-action 'none'")
"""The page loads nothing from elsewhere; the browser enforces it (and reports a breach)."""


def _page() -> bytes:
    return resources.files("mnist_jax").joinpath("static/draw.html").read_bytes()


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes:
    from ``Content-Length`` before reading any of it, else while it streams in."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BadRequest(f"invalid Content-Length {length[:40]!r}")
        if int(length) > limit:
            raise BadRequest(f"body of {int(length):,} bytes is over the limit of {limit:,}",
                             status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body is over the limit of {limit:,} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_kind(content_type: str) -> str:
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        return "json"
    if kind.startswith("image/") or kind == "application/octet-stream":
        return "image"
    raise BadRequest(f"unsupported Content-Type {kind or '(none)'!r}: send an image "
                     "(image/png, image/jpeg, ...) or application/json", status=415)


def create_app(predictor: Predictor, info: RunInfo, *, max_body: int = DEFAULT_MAX_BODY,
               scratch: str | Path | None = None) -> Any:
    """The Starlette app over a started :class:`Predictor` (see the module docstring).

    ``POST /predict?image=1`` adds ``"image"``: the 28x28 input the model saw, as a PNG
    data URL. ``scratch`` is the folder for uploaded files while they are decoded.
    """
    page = _page()

    async def index(request):
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": _PAGE_POLICY,
                                 "Cache-Control": "no-cache"})

    async def health(request):
        return JSONResponse(info.as_dict())

    async def predict(request):
        try:
            kind = _body_kind(request.headers.get("content-type", ""))
            body = await _read_body(request, max_body)
            if kind == "json" and len(body) <= _INLINE_JSON:
                image = parse_pixels(body)
            elif kind == "json":
                image = await run_in_threadpool(parse_pixels, body)
            else:
                image = await run_in_threadpool(decode_image, body, scratch)
            del body
            probs = await asyncio.wrap_future(predictor.submit(image))
        except BadRequest as e:
            # an unread body would otherwise hold the connection open until it arrives
            close = {"Connection": "close"} if e.status == 413 else None
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=close)
        out: dict[str, Any] = {"class": int(np.argmax(probs)), "probabilities": probs.tolist()}
        if request.query_params.get("image") in ("1", "true", "png"):
            out["image"] = png_data_url(image)
        return JSONResponse(out)

    async def http_error(request, exc: HTTPException):
        messages = {404: f"no such path {request.url.path[:80]!r} (try /, /health, /predict)",
                    405: f"method {request.method} not allowed on {request.url.path[:80]}"}
        return JSONResponse({"error": messages.get(exc.status_code, str(exc.detail))},
                            status_code=exc.status_code, headers=exc.headers)

    async def server_error(request, exc: Exception):
        print(f"mnist-jax serve: error: {type(exc).__name__}: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500)

    routes = [Route("/", index, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------
def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(f"invalid --port {port}: must be 0 to 65535 (0: any free port)")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: one the system chooses)."""
    _check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"invalid --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def host_warning(host: str) -> str | None:
    """The warning for a ``--host`` that other machines may reach (None for loopback)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        local = bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                        for a in addresses)
    except (OSError, ValueError):
        local = False
    if local:
        return None
    return (f"warning: listening on {host}, which other machines may reach; the API has no "
            "authentication: anyone who can reach it can use it")


def _uvicorn_server(app: Any) -> Any:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=3, server_header=False)
    return uvicorn.Server(config)


@dataclasses.dataclass
class ServerHandle:
    """A server running in a background thread (:func:`start_server`)."""

    url: str
    predictor: Predictor
    info: RunInfo
    server: Any
    thread: threading.Thread
    scratch: str

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight, end the worker."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.predictor.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 model_index: int | None = None, ensemble: bool = False,
                 max_body: int = DEFAULT_MAX_BODY, max_wait: float = DEFAULT_MAX_WAIT
                 ) -> ServerHandle:
    """Serve ``run_dir`` from a background thread of this process; returns once it accepts
    connections. ``handle.stop()`` (or ``with``) ends it."""
    import time
    predictor, info = load_predictor(run_dir, model_index=model_index, ensemble=ensemble,
                                     max_wait=max_wait)
    sock = _bind(host, port)
    scratch = tempfile.mkdtemp(prefix="mnist-jax-serve-")
    server = _uvicorn_server(create_app(predictor.start(), info, max_body=max_body,
                                        scratch=scratch))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="mnist-jax-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            predictor.stop()
            raise UsageError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    return ServerHandle(_url(sock, host), predictor, info, server, thread, scratch)


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          model_index: int | None = None, ensemble: bool = False,
          max_body: int = DEFAULT_MAX_BODY, log: Callable[[str], None] = print) -> None:
    """``mnist-jax serve``: serve ``run_dir`` until Ctrl-C (or SIGTERM).

    Prints ``serving RUN_DIR at http://HOST:PORT`` once it accepts connections; a host
    other than a loopback address gets a warning on stderr that the API has no
    authentication.
    """
    if max_body < 1:
        raise UsageError(f"invalid --max-body {max_body}: must be at least 1 byte")
    _check_port(port)  # before the seconds of loading and compiling
    predictor, info = load_predictor(run_dir, model_index=model_index, ensemble=ensemble)
    sock = _bind(host, port)
    scratch = tempfile.mkdtemp(prefix="mnist-jax-serve-")
    server = _uvicorn_server(create_app(predictor.start(), info, max_body=max_body,
                                        scratch=scratch))
    url = _url(sock, host)
    warning = host_warning(host)
    if warning:
        print(f"mnist-jax serve: {warning}", file=sys.stderr)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            log(f"serving {run_dir} at {url}")
            sys.stdout.flush()
        await task

    # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again for the
    # previous handler: Python's turns SIGINT into KeyboardInterrupt, ours SIGTERM into
    # _Stopped (the default would kill the process before the clean-up below).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
    try:
        asyncio.run(run())
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        predictor.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print("mnist-jax serve: stopped", file=sys.stderr)
