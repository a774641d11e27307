"""Token shards: the `.bin` layout of llm.c and modded-nanogpt, so their pre-tokenized FineWeb files
load unchanged. A shard is a header of 256 little-endian int32 — [0] magic 20240520, [1] version 1,
[2] token count, the rest zero — followed by that many little-endian uint16 token ids."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from speedrun.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def read_header(path: str | Path) -> int:
    """Check a shard's header against its file length and return its token count."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a token shard") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise DataError(f"{path}: not a token shard (magic number {magic}, expected {MAGIC})")
    if version != VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (only version {VERSION} is known)")
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise DataError(f"{path}: {state}: file is {size} bytes but its header promises {count} tokens ({expected} bytes)")
    return count


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 array backed by a memory map, so a 200 MB shard costs
    no copy and only the pages actually touched are read. With `vocab_size`, every id is checked."""
    path = Path(path)
    count = read_header(path)
    if count == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    tokens = np.frombuffer(mapped, dtype=TOKEN_DTYPE, count=count, offset=HEADER_BYTES)
    if vocab_size is not None:
        check_vocab(path, tokens, vocab_size)
    return tokens


def check_vocab(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[where])} at position {where} is out of range "
                        f"for a vocabulary of {vocab_size}")


def write_shard(path: str | Path, tokens) -> Path:
    """Write a shard atomically: readers see either no file or the whole file, never a partial one."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens for {path} must be a 1-D integer array, got {tokens.dtype} with shape {tokens.shape}")
    if tokens.dtype != TOKEN_DTYPE and tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        raise ValueError(f"tokens for {path} must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shards are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
