import struct
import subprocess
import sys

import numpy as np
import pytest

from speedrun.data import shards
from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import DataError


def speedrun(*args):
    return subprocess.run([sys.executable, "-m", "speedrun", *args], capture_output=True, text=True, timeout=120)


def independent_read(path):
    raw = path.read_bytes()
    magic, version, count = struct.unpack("<3i", raw[:12])
    assert (magic, version) == (20240520, 1)
    assert raw[12:1024] == bytes(1012)
    return list(struct.unpack(f"<{count}H", raw[1024:]))


def test_write_then_read_round_trip_without_copying(tmp_path):
    tokens = np.array([EOT, 15496, 995, 0, 50255, 65535], dtype=np.uint16)
    path = shards.write_shard(tmp_path / "a.bin", tokens)
    assert independent_read(path) == tokens.tolist()
    assert path.stat().st_size == 1024 + 2 * tokens.size
    got = shards.read_shard(path)
    assert got.tolist() == tokens.tolist()
    assert not got.flags.owndata and not got.flags.writeable  # a view of the memory map
    assert shards.read_header(path) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left behind


def test_writer_replaces_atomically_and_takes_any_small_ints(tmp_path):
    path = tmp_path / "a.bin"
    shards.write_shard(path, np.arange(10))
    shards.write_shard(path, [1, 2, 3])
    assert independent_read(path) == [1, 2, 3]
    assert shards.read_shard(shards.write_shard(tmp_path / "e.bin", np.empty(0, np.int64))).size == 0
    with pytest.raises(ValueError, match="uint16"):
        shards.write_shard(tmp_path / "b.bin", np.array([70000]))
    assert not (tmp_path / "b.bin").exists()


def corrupt(tmp_path, kind):
    path = shards.write_shard(tmp_path / f"{kind}.bin", np.array([EOT, 1, 2, 3, 4], dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    if kind == "truncated":
        raw = raw[:-3]
    elif kind == "magic":
        raw[0:4] = struct.pack("<i", 12345)
    elif kind == "version":
        raw[4:8] = struct.pack("<i", 7)
    elif kind == "long":
        raw += b"\0\0"
    elif kind == "header":
        raw = raw[:100]
    elif kind == "vocab":
        raw[1024 + 4:1024 + 6] = struct.pack("<H", 50257)
    path.write_bytes(bytes(raw))
    return path


PROBLEMS = {
    "truncated": "truncated: file is 1031 bytes but its header promises 5 tokens (1034 bytes)",
    "magic": "not a token shard (magic number 12345, expected 20240520)",
    "version": "unsupported shard version 7 (only version 1 is known)",
    "long": "corrupt: file is 1036 bytes but its header promises 5 tokens (1034 bytes)",
    "header": "truncated: 100 bytes, shorter than the 1024-byte shard header",
    "vocab": "token id 50257 at position 2 is out of range for a vocabulary of 50257",
}


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_reader_names_the_file_and_the_problem(tmp_path, kind):
    path = corrupt(tmp_path, kind)
    with pytest.raises(DataError) as caught:
        shards.read_shard(path, vocab_size=50257)
    assert str(caught.value) == f"{path}: {PROBLEMS[kind]}"
    if kind == "vocab":
        assert shards.read_shard(path).size == 5  # ids are only checked when asked


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        shards.read_shard(tmp_path / "nope.bin")


def test_inspect_reports_counts_and_text(tmp_path):
    enc = gpt2()
    tokens = [EOT] + enc.encode_ordinary("Hello world, this is a shard.") + [EOT] + enc.encode_ordinary("Second.")
    path = shards.write_shard(tmp_path / "x_val_000000.bin", tokens)
    result = speedrun("data", "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert f"tokens     {len(tokens)}" in result.stdout
    assert "documents  2" in result.stdout
    assert "'Hello world, this is a shard.'" in result.stdout


@pytest.mark.parametrize("kind", ["truncated", "magic", "vocab"])
def test_inspect_fails_with_one_line(tmp_path, kind):
    good = shards.write_shard(tmp_path / "good.bin", [EOT, 1])
    path = corrupt(tmp_path, kind)
    result = speedrun("data", "inspect", str(good), str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"speedrun data: error: {path}: {PROBLEMS[kind]}"]
    assert str(good) in result.stdout
