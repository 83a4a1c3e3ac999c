"""``mnist-jax serve``'s API (:mod:`mnist_jax.serve`) over a real trained run.

An MLP is trained for one epoch on real MNIST (a few seconds) and served on 127.0.0.1 from a
thread of this process (``start_server``), or as the real command in a subprocess where the
process itself matters (the ready line, Ctrl-C, its memory). Photo-like digits
(``render_like_photo``) must get the answers ``mnist-jax predict --json`` prints; every bad
body must be a 400 with a one-line JSON error and leave the server answering; requests sent
together must share compiled calls and never compile.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn): "
                    "pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn): "
                    "pip install -e '.[serve]'")

import mnist_jax as mj  # noqa: E402
from mnist_jax import cli, serve  # noqa: E402
from mnist_jax.images import render_like_photo  # noqa: E402

pytestmark = pytest.mark.realdata
N_PHOTOS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    run = tmp_path_factory.mktemp("serve_run") / "mlp-mnist"
    assert cli.main(["train", "--data-dir", str(mnist_dir), "--out", str(run), "--epochs", "1",
                     "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def test_digits(mnist_dir):
    ds = mj.load_dataset("mnist", mnist_dir)
    return ds.test_images[:64], ds.test_labels[:64]


@pytest.fixture(scope="module")
def server(trained):
    with serve.start_server(trained) as handle:
        yield handle


@pytest.fixture(scope="module")
def photos(tmp_path_factory, test_digits):
    """Photo-like PNG and JPEG files of real test digits."""
    folder = tmp_path_factory.mktemp("serve_photos")
    rng = np.random.default_rng(34)
    files = []
    for k, digit in enumerate(test_digits[0][:N_PHOTOS]):
        path = folder / f"{k:02d}.{'png' if k % 2 else 'jpg'}"
        img = render_like_photo(digit, rng)
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        files.append(path)
    return files


def _request(url: str, method: str, path: str, body: bytes | None = None,
             content_type: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _post(url: str, body: bytes, content_type: str, path: str = "/predict"):
    return _request(url, "POST", path, body, content_type)


def _pixels(image: np.ndarray) -> bytes:
    return json.dumps({"pixels": np.asarray(image).tolist()}).encode()


# ---------------------------------------------------------------------------------------
# the same answers as mnist-jax predict
# ---------------------------------------------------------------------------------------
def test_photo_digits_get_the_class_and_probabilities_of_predict_json(server, trained, photos,
                                                                     capsys):
    assert cli.main(["predict", str(trained), *map(str, photos), "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reference = mj.predict_images(mj.load_run(trained).model_state(0), list(map(str, photos)))
    assert [r["file"] for r in printed] == [str(p) for p in photos]
    for path, cli_rec, api_rec in zip(photos, printed, reference):
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        status, answer = _post(server.url, path.read_bytes(), kind)
        assert status == 200, answer
        assert answer["class"] == cli_rec["class"] == api_rec["class"]
        probs = np.array(answer["probabilities"])
        assert probs.shape == (10,)
        np.testing.assert_allclose(probs, api_rec["probabilities"], rtol=0, atol=1e-6)
        for top in cli_rec["top3"]:
            assert abs(probs[top["class"]] - top["probability"]) <= 1e-6


def test_photos_are_mostly_recognised(server, photos, test_digits):
    labels = test_digits[1][:N_PHOTOS]
    got = [_post(server.url, p.read_bytes(), "image/png")[1]["class"] for p in photos]
    assert np.mean(np.array(got) == labels) >= 0.75, (got, labels.tolist())


def test_image_query_returns_the_28x28_input_the_model_saw(server, photos):
    from PIL import Image
    import base64
    status, answer = _post(server.url, photos[1].read_bytes(), "image/png",
                           path="/predict?image=1")
    assert status == 200
    prefix = "data:image/png;base64,"
    assert answer["image"].startswith(prefix)
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"][len(prefix):]))))
    np.testing.assert_array_equal(seen, mj.load_image(photos[1]))


def test_json_pixels_form_matches_predict_on_the_raw_digits(server, trained, test_digits):
    images, labels = test_digits
    expected = mj.predict(mj.load_run(trained).model_state(0), images[:8])
    for img, want in zip(images[:8], expected):
        status, answer = _post(server.url, _pixels(img), "application/json")
        assert status == 200, answer
        assert answer["class"] == int(want.argmax())
        np.testing.assert_allclose(answer["probabilities"], want, rtol=0, atol=1e-6)
    # floats are rounded to the nearest level, as uint8 pixels
    nudged = np.minimum(images[0] + 0.3, 255.0)
    status, answer = _post(server.url, _pixels(nudged), "application/json")
    np.testing.assert_allclose(answer["probabilities"], expected[0], rtol=0, atol=1e-6)


def test_health_names_the_run_and_its_test_accuracy(server, trained):
    status, info = _request(server.url, "GET", "/health")
    results = json.loads((trained / "results.json").read_text())
    assert status == 200
    assert info == {"status": "ok", "run": "mlp-mnist", "model": "mlp", "served": "model 0",
                    "test_accuracy": pytest.approx(results["test_accuracy"])}


def test_page_is_self_contained_html(server):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    conn.close()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/html")
    assert "default-src 'none'" in response.getheader("content-security-policy")
    for needle in ("<canvas", 'id="clear"', 'type="file"', "pointerdown", "predict?image=1"):
        assert needle in page
    for external in ("http://", "https://", "//cdn", "@import"):
        assert external not in page  # works offline: nothing is fetched from elsewhere


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def _png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~110 KB that decode to 900 M pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _good_png(photos) -> bytes:
    return photos[1].read_bytes()


BAD_BODIES = {
    "not an image": (b"hello, this is not a picture", "image/png"),
    "truncated png": (None, "image/png"),
    "empty image": (b"", "image/png"),
    "blank image": (None, "image/png"),
    "empty json": (b"", "application/json"),
    "invalid json": (b'{"pixels": [[0, 1', "application/json"),
    "json not an object": (b"[1, 2, 3]", "application/json"),
    "json without pixels": (b'{"image": []}', "application/json"),
    "27 rows": (json.dumps({"pixels": [[0] * 28] * 27}).encode(), "application/json"),
    "a row of 29": (json.dumps({"pixels": [[0] * 28] * 27 + [[0] * 29]}).encode(),
                    "application/json"),
    "flat 784": (json.dumps({"pixels": [0] * 784}).encode(), "application/json"),
    "value 256": (json.dumps({"pixels": [[0] * 28] * 27 + [[0] * 27 + [256]]}).encode(),
                  "application/json"),
    "negative value": (json.dumps({"pixels": [[-1] * 28] * 28}).encode(), "application/json"),
    "string value": (json.dumps({"pixels": [["0"] * 28] * 28}).encode(), "application/json"),
    "boolean value": (json.dumps({"pixels": [[True] * 28] * 28}).encode(), "application/json"),
    "NaN value": (b'{"pixels": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28)
                  + b"]}", "application/json"),
    "deep nesting": (b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "not utf-8": (b'{"pixels": "\xff\xfe"}', "application/json"),
    "bomb 30000x30000": (None, "image/png"),
}


def _bad_body(name: str, photos) -> tuple[bytes, str]:
    body, kind = BAD_BODIES[name]
    if name == "truncated png":
        body = _good_png(photos)[:300]
    elif name == "blank image":
        from PIL import Image
        buf = io.BytesIO()
        Image.new("L", (64, 64), 255).save(buf, format="PNG")
        body = buf.getvalue()
    elif name == "bomb 30000x30000":
        body = _png_bomb()
        assert len(body) < 200_000
    return body, kind


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_body_is_a_400_with_one_line_and_the_server_keeps_answering(server, photos, name):
    body, kind = _bad_body(name, photos)
    status, answer = _post(server.url, body, kind)
    assert status == 400, answer
    assert list(answer) == ["error"]
    assert answer["error"] and "\n" not in answer["error"] and len(answer["error"]) < 300
    assert "upload-" not in answer["error"]  # the scratch file is not the user's business
    if name == "bomb 30000x30000":
        # refused by the size its header gives (that nothing is decoded first is
        # tests/test_images.py's test_decompression_bomb_refused_before_decoding)
        assert "too large (900,000,000 pixels" in answer["error"]
    status, _ = _post(server.url, _good_png(photos), "image/png")
    assert status == 200


def test_other_content_types_are_415(server):
    status, answer = _post(server.url, b"1,2,3", "text/csv")
    assert status == 415 and "Content-Type" in answer["error"]
    status, answer = _request(server.url, "POST", "/predict", b"abc")  # none at all
    assert status == 415


@pytest.mark.parametrize("method,path,code", [("GET", "/predict", 405), ("PUT", "/predict", 405),
                                              ("DELETE", "/", 405), ("POST", "/health", 405),
                                              ("GET", "/nope", 404), ("POST", "/predict/x", 404)])
def test_wrong_method_or_path_is_a_json_error(server, method, path, code):
    status, answer = _request(server.url, method, path, b"" if method != "GET" else None)
    assert status == code and list(answer) == ["error"] and "\n" not in answer["error"]
    assert _request(server.url, "GET", "/health")[0] == 200


def _raw_exchange(url: str, head: bytes, body_parts) -> bytes:
    """Send ``head`` and then the parts (stopping if the server hangs up); returns what the
    server answered (nothing if it waited past the socket's timeout for more)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        try:
            for part in body_parts:
                s.sendall(part)
        except OSError:  # the server refused and closed: what it said is in the buffer
            pass
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            try:
                got = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not got:
                break
            data += got
    return data


def test_body_over_max_body_is_413_without_being_read(server):
    # The header announces 20 MB, only 1 KB is ever sent: an answer at all means the server
    # did not wait to read the rest.
    head = (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            b"Content-Length: 20000000\r\n\r\n")
    data = _raw_exchange(server.url, head, [b"\0" * 1024])
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b'"error":"body of 20,000,000 bytes is over the limit of 10,000,000"' in data
    assert _request(server.url, "GET", "/health")[0] == 200


def test_streamed_body_over_max_body_is_413_once_it_passes_the_limit(trained):
    chunk = b"\0" * 4096
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(64)] + [b"0\r\n\r\n"]
    head = (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with serve.start_server(trained, max_body=50_000) as small:
        data = _raw_exchange(small.url, head, parts)
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"over the limit of 50,000 bytes" in data
        assert _request(small.url, "GET", "/health")[0] == 200


# ---------------------------------------------------------------------------------------
# load: batching, no compilation
# ---------------------------------------------------------------------------------------
def test_concurrent_clients_share_compiled_calls_and_get_their_own_answers(server, trained,
                                                                         test_digits):
    import jax.monitoring
    images = test_digits[0][:48]
    expected = mj.predict(mj.load_run(trained).model_state(0), images)
    compiles: list[str] = []
    watching = threading.Event()

    def on_event(event: str, duration: float, **kwargs) -> None:
        if watching.is_set() and "compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    before = dict(server.predictor.stats)
    barrier = threading.Barrier(len(images))
    answers: list = [None] * len(images)

    def client(i: int) -> None:
        barrier.wait()
        answers[i] = _post(server.url, _pixels(images[i]), "application/json")

    watching.set()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    watching.clear()
    for (status, answer), want in zip(answers, expected):
        assert status == 200
        np.testing.assert_allclose(answer["probabilities"], want, rtol=0, atol=1e-6)
    calls = server.predictor.stats["calls"] - before.get("calls", 0)
    served = server.predictor.stats["images"] - before.get("images", 0)
    assert served == len(images)
    assert calls < len(images) / 2, server.predictor.stats  # batched, not one call each
    assert compiles == []


def test_predictor_without_batching_runs_each_request_alone(trained, test_digits):
    predictor = serve.Predictor(mj.load_run(trained).model_state(0), batch_sizes=(1, 4))
    predictor.batching = False
    predictor.start()
    try:
        futures = [predictor.submit(img) for img in test_digits[0][:6]]
        got = np.stack([f.result(30) for f in futures])
    finally:
        predictor.stop()
    assert predictor.stats["calls"] == 6 and predictor.stats["size_1"] == 6
    want = mj.predict(mj.load_run(trained).model_state(0), test_digits[0][:6])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_waiting_requests_run_as_full_batches_and_none_is_computed_for_nothing(trained,
                                                                              test_digits):
    """Seven requests waiting with batch sizes 1 and 4: a call of 4, then the three left
    (with no newcomer) as calls of 1; every image computed is a request's, and every
    answer is its own image's."""
    predictor = serve.Predictor(mj.load_run(trained).model_state(0), batch_sizes=(1, 4),
                                max_wait=0.0)
    images = test_digits[0][:7]
    futures = [predictor.submit(img) for img in images]  # queued before the worker starts
    predictor.start()
    try:
        got = np.stack([f.result(30) for f in futures])
    finally:
        predictor.stop()
    assert dict(predictor.stats) == {"calls": 4, "images": 7, "size_4": 1, "size_1": 3}
    want = mj.predict(mj.load_run(trained).model_state(0), images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_cancelled_request_is_skipped_and_the_worker_goes_on(trained, test_digits):
    predictor = serve.Predictor(mj.load_run(trained).model_state(0), batch_sizes=(1, 4))
    gone = predictor.submit(test_digits[0][0])  # queued before the worker starts
    assert gone.cancel()
    predictor.start()
    try:
        kept = predictor.submit(test_digits[0][1]).result(30)
    finally:
        predictor.stop()
    assert kept.shape == (10,) and predictor.stats["images"] == 1


# ---------------------------------------------------------------------------------------
# the command itself
# ---------------------------------------------------------------------------------------
def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_command_prints_one_ready_line_survives_a_barrage_and_stops_on_ctrl_c(trained, photos):
    proc = subprocess.Popen([sys.executable, "-m", "mnist_jax.cli", "serve", str(trained),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {trained} at http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        good = _good_png(photos)

        def barrage(rounds: int) -> None:
            for _ in range(rounds):
                for name in BAD_BODIES:
                    body, kind = _bad_body(name, photos)
                    assert _post(url, body, kind)[0] == 400
                head = (b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                        b"Content-Length: 20000000\r\n\r\n")
                assert _raw_exchange(url, head, [b"\0" * 1024]).startswith(b"HTTP/1.1 413")
                assert _post(url, good, "image/png")[0] == 200

        barrage(2)  # warm: every code path has run once
        if Path(f"/proc/{proc.pid}/status").exists():
            before = _rss_bytes(proc.pid)
            barrage(8)
            grown = _rss_bytes(proc.pid) - before
            print(f"\nserver RSS {before / 2**20:.0f} MiB before 8 more rounds of "
                  f"{len(BAD_BODIES) + 1} bad requests, grown by {grown / 2**20:+.1f} MiB")
            assert grown < 40 * 2**20
        assert _request(url, "GET", "/health")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    assert "serving" not in out  # printed once
    assert "warning" not in err  # 127.0.0.1: no warning


def test_command_stops_cleanly_on_sigterm(trained):
    proc = subprocess.Popen([sys.executable, "-m", "mnist_jax.cli", "serve", str(trained),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), line
        assert _request(line.split()[-1], "GET", "/health")[0] == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_another_host_is_warned_that_the_api_has_no_authentication():
    assert serve.host_warning("127.0.0.1") is None
    assert serve.host_warning("localhost") is None
    for host in ("0.0.0.0", "192.0.2.7"):
        assert "no authentication" in serve.host_warning(host)


def test_bad_flags_are_one_line_usage_errors(trained, capsys):
    assert cli.main(["serve", str(trained), "--model-index", "1", "--port", "0"]) == 2
    assert "trained 1 model(s), 0 to 0" in capsys.readouterr().err
    assert cli.main(["serve", str(trained), "--ensemble", "--port", "0"]) == 2
    assert "trained one model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(trained), "--ensemble", "--model-index", "0"])
    assert exit_.value.code == 2
    assert cli.main(["serve", str(trained), "--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert "invalid --host" in capsys.readouterr().err
    assert cli.main(["serve", str(trained), "--port", "70000"]) == 2
    assert "invalid --port 70000" in capsys.readouterr().err
    assert cli.main(["serve", str(trained.parent / "no-such-run"), "--port", "0"]) == 2


def test_without_the_serve_extra_the_command_says_what_to_install(trained):
    code = ("import sys; sys.modules['starlette'] = None; from mnist_jax import cli; "
            f"sys.exit(cli.main(['serve', {str(trained)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "starlette is missing" in done.stderr and "mnist-jax[serve]" in done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_is_a_usage_error(trained, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        assert cli.main(["serve", str(trained), "--port", str(busy)]) == 2
    assert f"cannot listen on 127.0.0.1:{busy}" in capsys.readouterr().err


def test_ensemble_serves_the_mean_of_the_models(tmp_path, mnist_dir, test_digits):
    run = tmp_path / "two"
    assert cli.main(["train", "--data-dir", str(mnist_dir), "--out", str(run), "--epochs", "1",
                     "--seeds", "0,1", "--quiet"]) == 0
    loaded = mj.load_run(run)
    images = test_digits[0][:4]
    per_model = [mj.predict(loaded.model_state(i), images) for i in range(2)]
    with serve.start_server(run, ensemble=True) as ens, \
            serve.start_server(run, model_index=1) as second:
        assert _request(ens.url, "GET", "/health")[1]["served"] == "ensemble of 2 models"
        for k, img in enumerate(images):
            _, answer = _post(ens.url, _pixels(img), "application/json")
            np.testing.assert_allclose(answer["probabilities"],
                                       (per_model[0][k] + per_model[1][k]) / 2, atol=1e-6)
            _, answer = _post(second.url, _pixels(img), "application/json")
            np.testing.assert_allclose(answer["probabilities"], per_model[1][k], atol=1e-6)
