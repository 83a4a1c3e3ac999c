"""No data folder means download (issue #14.1), tested without the internet: the official
archives are served from a local HTTP server on 127.0.0.1, and ``MNIST_JAX_MNIST_URL``
(``data.url_env("mnist")``) points tfds' download at it; tfds still validates the checksums
it registers for the official URLs."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mnist_jax import data
from mnist_jax.data import load_dataset, load_idx_folder
from mnist_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_data_load_worker.py"
sys.path.insert(0, str(WORKER.parent))
from _data_load_worker import digest  # noqa: E402

WAITING = "mnist-jax: waiting for another process preparing mnist in "


class Mirror:
    """A loopback HTTP server for one folder, counting the files it served."""

    def __init__(self, folder: Path):
        self.gets: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet; count instead
                mirror.gets.append(f"{self.path} {args[1] if len(args) > 1 else ''}")

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_folder(monkeypatch, tmp_path):
    """No --data-dir, no $MNIST_JAX_DATA_DIR, a cold private cache, no proxy for loopback."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "cache"


def env_for(cache: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != data.DATA_DIR_ENV}
    return {**env, data.CACHE_DIR_ENV: str(cache), data.url_env("mnist"): url,
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.realdata
def test_no_folder_downloads_once_validates_and_loads(mnist_dir, no_folder):
    # Three processes at once on a cold cache (a sweep launching runs in parallel).
    with Mirror(mnist_dir) as mirror:
        procs = [subprocess.Popen([sys.executable, str(WORKER), "mnist"], cwd=ROOT,
                                  env=env_for(no_folder, mirror.url), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            results.append((json.loads(out.strip().splitlines()[-1]), err.strip().splitlines()))
        served = sorted(mirror.gets)
    assert served == sorted(f"/{s}.gz 200" for s in data.IDX_FILES.values())  # each once
    assert {r["sha256"] for r, _ in results} == {digest(load_idx_folder(mnist_dir))}
    assert sorted(r["source"] for r, _ in results) == ["cache", "cache", "tfds"]
    assert all(r["test_labels"] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] for r, _ in results)
    for _, lines in results:
        assert all(line.startswith(WAITING) for line in lines), "\n".join(lines)
    # Later runs use the cache: no request reaches the server, TensorFlow is not imported.
    with Mirror(mnist_dir) as mirror:
        ds = load_dataset("mnist")
        assert ds.source == "cache" and mirror.gets == []
    assert sorted(p.name for p in (no_folder / "archives" / "mnist").iterdir()) == sorted(
        f"{s}.gz" for s in data.IDX_FILES.values())


def test_a_server_answering_404_gives_one_line(no_folder, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with Mirror(tmp_path / "empty") as mirror, pytest.raises(DataError) as e:
        monkeypatch.setenv(data.url_env("mnist"), mirror.url)
        load_dataset("mnist")
    msg = str(e.value)
    assert "\n" not in msg and "could not download mnist" in msg and "404" in msg, msg
    assert "--data-dir DIR" in msg and "official archives" in msg
    assert not (no_folder / "archives" / "mnist").exists() or not any(
        (no_folder / "archives" / "mnist").iterdir())


def test_a_mirror_with_other_bytes_fails_tfds_checksum_validation(no_folder, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data import make_folder

    fake = make_folder(tmp_path / "fake")  # valid IDX archives, not the official bytes
    with Mirror(fake) as mirror, pytest.raises(DataError) as e:
        monkeypatch.setenv(data.url_env("mnist"), mirror.url)
        load_dataset("mnist")
    msg = str(e.value)
    assert "\n" not in msg and "wrong checksum" in msg and "--data-dir DIR" in msg, msg
    assert not list((no_folder / "archives").rglob("*.gz"))  # nothing unvalidated is kept


def test_the_failure_is_reported_while_other_downloads_still_write(no_folder, monkeypatch):
    """tfds downloads the four archives on threads: when one fails, the others go on writing
    into the temporary folder while it is removed. The failure is what gets reported, not
    the folder that could not be removed (a flaky ``Directory not empty`` before)."""
    stop = threading.Event()

    class FailingWhileOthersWrite:  # tfds' DownloadManager, as it fails
        def __init__(self, download_dir, **_):
            self.folder = Path(download_dir)

        def download(self, urls):
            def write():
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        (self.folder / f"part{i % 20}").mkdir(exist_ok=True)
                        (self.folder / f"part{i % 20}" / str(i)).write_bytes(b"x")
                    except OSError:
                        pass
            threading.Thread(target=write, daemon=True).start()
            while not any(self.folder.iterdir()):
                pass
            raise ValueError("train-images-idx3-ubyte.gz: wrong checksum")

    monkeypatch.setattr(data._import_tfds().download, "DownloadManager", FailingWhileOthersWrite)
    monkeypatch.setattr(data, "_check_reachable", lambda url: None)
    try:
        for _ in range(5):
            with pytest.raises(DataError) as e:
                data.download_archives("mnist")
            assert "wrong checksum" in str(e.value) and "--data-dir DIR" in str(e.value), e.value
    finally:
        stop.set()


def test_offline_names_what_failed_and_the_way_out(no_folder, monkeypatch):
    monkeypatch.setenv(data.url_env("mnist"), "http://127.0.0.1:9/mnist/")  # nothing listens
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    assert "\n" not in msg and "cannot reach 127.0.0.1:9" in msg, msg
    assert "--data-dir DIR" in msg and data.DATA_DIR_ENV in msg


def test_the_cli_reports_a_failed_download_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with Mirror(tmp_path / "empty") as mirror:
        proc = subprocess.run(
            [sys.executable, "-m", "mnist_jax.cli", "train", "--out", str(tmp_path / "run"),
             "--epochs", "1", "--quiet"], cwd=tmp_path, env=env_for(tmp_path / "cache", mirror.url),
            capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-jax: error: "), proc.stderr
    assert "404" in lines[0] and "--data-dir DIR" in lines[0]
