"""`speedrun data fineweb` against a local stand-in for the Hugging Face hub: an HTTP server on
127.0.0.1 that answers the HEAD and GET requests huggingface_hub's hf_hub_download makes for
/datasets/{repo}/resolve/{revision}/{filename}, with the headers it reads (X-Repo-Commit, ETag,
Content-Length) and byte ranges, which it uses to resume a dropped download."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from speedrun.data import shards

REPO = "kjj0/fineweb10B-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def shard_bytes(tmp_path, seed: int, n: int) -> bytes:
    path = tmp_path / f"src{seed}.bin"
    shards.write_shard(path, np.random.default_rng(seed).integers(0, 50257, n, dtype=np.uint16))
    return path.read_bytes()


class FakeHub:
    def __init__(self, files: dict[str, bytes], drop_after: dict[str, int] | None = None):
        self.files = files
        self.drop_after = dict(drop_after or {})  # filename -> bytes sent before the first GET is cut off
        self.gets: list[tuple[str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _lookup(self):
                m = re.fullmatch(r"/datasets/(.+?)/resolve/([^/]+)/(.+)", self.path)
                if not m or m.group(1) != REPO or m.group(3) not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None, None
                name = m.group(3)
                return name, hub.files[name]

            def _headers(self, status, data, length, extra=()):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                for key, value in extra:
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self):
                name, data = self._lookup()
                if name is not None:
                    self._headers(200, data, len(data))

            def do_GET(self):
                name, data = self._lookup()
                if name is None:
                    return
                requested = self.headers.get("Range")
                hub.gets.append((name, requested))
                start = 0
                if requested:
                    start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
                    self._headers(206, data, len(data) - start, [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
                else:
                    self._headers(200, data, len(data))
                cut = hub.drop_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run_fineweb(tmp_path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    return subprocess.run([sys.executable, "-m", "speedrun", "data", "fineweb", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    return {
        "fineweb_val_000000.bin": shard_bytes(tmp_path, 0, 3000),
        "fineweb_train_000001.bin": shard_bytes(tmp_path, 1, 5000),
        "fineweb_train_000002.bin": shard_bytes(tmp_path, 2, 7000),
        "fineweb_train_000003.bin": shard_bytes(tmp_path, 3, 1000),
    }


def test_downloads_val_and_train_shards_then_nothing_the_second_time(tmp_path, files):
    out = tmp_path / "d"
    with FakeHub(files) as hub:
        first = run_fineweb(tmp_path, hub.url, "--train-shards", "2", "--dir", str(out))
        assert first.returncode == 0, first.stderr
        assert sorted(name for name, _ in hub.gets) == sorted(list(files)[:3])
        for name in list(files)[:3]:
            assert (out / name).read_bytes() == files[name]
        assert not (out / "fineweb_train_000003.bin").exists()

        again = run_fineweb(tmp_path, hub.url, "--train-shards", "2", "--dir", str(out))
        assert again.returncode == 0, again.stderr
        assert len(hub.gets) == 3
        assert "3 of 3 shards already" in again.stdout


def test_dropped_connection_resumes_with_a_range_request(tmp_path, files):
    # huggingface_hub writes what it receives in 10 MiB chunks, so resuming needs a file past that.
    name = "fineweb_train_000002.bin"
    files[name] = shard_bytes(tmp_path, 2, 6_000_000)
    out = tmp_path / "d"
    with FakeHub(files, drop_after={name: 11_000_000}) as hub:
        result = run_fineweb(tmp_path, hub.url, "--train-shards", "2", "--dir", str(out))
        assert result.returncode == 0, result.stderr
    ranges = [r for n, r in hub.gets if n == name]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_at <= 11_000_000
    assert (out / name).read_bytes() == files[name]


def test_broken_local_file_is_fetched_again(tmp_path, files):
    out = tmp_path / "d"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_bytes(files["fineweb_val_000000.bin"][:2000])
    with FakeHub(files) as hub:
        result = run_fineweb(tmp_path, hub.url, "--train-shards", "0", "--dir", str(out))
        assert result.returncode == 0, result.stderr
        assert [n for n, _ in hub.gets] == ["fineweb_val_000000.bin"]
    assert (out / "fineweb_val_000000.bin").read_bytes() == files["fineweb_val_000000.bin"]


def test_invalid_shard_on_the_hub_is_reported_and_not_kept(tmp_path, files):
    files["fineweb_val_000000.bin"] = b"<html>not a shard</html>" * 100
    out = tmp_path / "d"
    with FakeHub(files) as hub:
        result = run_fineweb(tmp_path, hub.url, "--train-shards", "0", "--dir", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a token shard" in lines[0] and "fineweb_val_000000.bin" in lines[0]
    assert not (out / "fineweb_val_000000.bin").exists()


def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_fineweb(tmp_path, f"http://127.0.0.1:{port}", "--train-shards", "1", "--dir", str(tmp_path / "d"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("speedrun data: error: cannot reach the Hugging Face hub")



def test_a_dir_that_is_a_file_is_refused_before_the_network(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for folder, why in [(afile, "exists and is not a folder"), (afile / "d", f"{afile} is a file, not a folder")]:
        result = run_fineweb(tmp_path, "http://127.0.0.1:9", "--train-shards", "1", "--dir", str(folder))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"speedrun data: error: --dir {folder}: {why}"]
    assert afile.read_text() == "x"

def test_bad_arguments_exit_2(tmp_path):
    result = run_fineweb(tmp_path, "http://127.0.0.1:9", "--train-shards", "104", "--dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert "--train-shards must be between 0 and 103" in result.stderr
