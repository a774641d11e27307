"""Text files → GPT-2 token shards (`speedrun data tokenize`).

Documents are read in input order in this process and encoded by a pool of workers whose results
come back in order, so the shards are byte-identical for any number of workers. Everything is
written to a temporary folder next to the output and moved under the final names only once every
input has been read without error."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speedrun.data import shards, tokenizer
from speedrun.errors import DataError, UsageError, first_line
from speedrun.rundir import make_folder

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_VAL_TOKENS = 10_485_760  # the record's validation set size
DEFAULT_SHARD_TOKENS = 100_000_000  # the size of the FineWeb shards
_BATCH_DOCS = 256
_BATCH_CHARS = 4_000_000
_BLANK_LINE = re.compile(r"\n\s*\n")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _text_documents(path: Path, blank_line_docs: bool) -> Iterator[str]:
    text = _read_text(path)
    if not blank_line_docs:
        yield text
        return
    yield from _BLANK_LINE.split(text.replace("\r\n", "\n"))


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting deeper than the stack
                raise DataError(f"{path}:{lineno}: not valid JSON ({first_line(e)})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}:{lineno}: no 'text' field")
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{lineno}: 'text' is not a string")
            yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = table.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'})")
    kind = table.schema_arrow.field("text").type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise DataError(f"{path}: column 'text' holds {kind}, not strings")
    try:
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:  # damaged pages, or strings not UTF-8
        raise DataError(f"{path}: damaged parquet data ({first_line(e)})") from None


def iter_documents(paths: list[Path], blank_line_docs: bool = False) -> Iterator[str]:
    """Every non-empty document of the inputs, in order. The format follows the file name: .jsonl and
    .ndjson are JSON lines with a `text` field, .parquet needs a `text` column, anything else is text."""
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            docs = _jsonl_documents(path)
        elif suffix in PARQUET_SUFFIXES:
            docs = _parquet_documents(path)
        else:
            docs = _text_documents(path, blank_line_docs)
        for doc in docs:
            if doc.strip():
                yield doc


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(batch: list[str]) -> tuple[int, np.ndarray]:
    return len(batch), tokenizer.encode_documents(batch)


class _ShardSink:
    """Cuts the token stream into `<prefix>_val_000000.bin` (the first `val_tokens` tokens) and
    `<prefix>_train_%06d.bin` files of `shard_tokens` tokens each."""

    def __init__(self, folder: Path, prefix: str, val_tokens: int, shard_tokens: int):
        self.folder, self.prefix = folder, prefix
        self.val_tokens, self.shard_tokens = val_tokens, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.written: list[tuple[str, int]] = []
        self.train_index = 0
        self.val_done = val_tokens == 0

    def _target(self) -> int:
        return self.shard_tokens if self.val_done else self.val_tokens

    def _write(self, tokens: np.ndarray) -> None:
        if self.val_done:
            name = f"{self.prefix}_train_{self.train_index:06d}.bin"
            self.train_index += 1
        else:
            name = f"{self.prefix}_val_{0:06d}.bin"
            self.val_done = True
        shards.write_shard(self.folder / name, tokens)
        self.written.append((name, tokens.size))

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        while self.pending_tokens >= self._target():
            stream = np.concatenate(self.pending)
            target = self._target()
            self._write(stream[:target])
            rest = stream[target:]
            self.pending, self.pending_tokens = [rest], rest.size

    def close(self) -> None:
        if self.pending_tokens and self.val_done:
            self._write(np.concatenate(self.pending))
        if not self.val_done or self.train_index == 0:
            total = sum(n for _, n in self.written) + self.pending_tokens
            raise DataError(f"the inputs hold only {total:,} tokens, not more than --val-tokens {self.val_tokens:,}: "
                            "nothing would be left for training; lower --val-tokens")


def tokenize_files(inputs: list[str | Path], out_dir: str | Path, *, val_tokens: int = DEFAULT_VAL_TOKENS,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
                   blank_line_docs: bool = False, prefix: str = "data", progress: bool = True) -> list[tuple[Path, int]]:
    """Tokenize the inputs into shards under `out_dir`; returns (path, token count) per shard written.
    Shards of an earlier run with the same prefix that this run did not produce are removed, so the
    folder never mixes two runs."""
    from tqdm import tqdm

    if val_tokens < 0:
        raise UsageError(f"--val-tokens must be zero or positive, got {val_tokens}")
    if shard_tokens <= 0:
        raise UsageError(f"--shard-tokens must be positive, got {shard_tokens}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", prefix):
        raise UsageError(f"--prefix '{prefix}' must be letters, digits, '.' or '-' (no '_' or '/')")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 0:
        raise UsageError(f"--workers must be positive, got {workers}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UsageError("no input files given")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")

    out = Path(out_dir)
    created = not out.exists()
    make_folder(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{prefix}-tokenize-"))
    try:
        sink = _ShardSink(staging, prefix, val_tokens, shard_tokens)
        batches = _batches(iter_documents(paths, blank_line_docs))
        bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=None if progress else True)
        with bar:
            if workers == 1:
                results = map(_encode_batch, batches)
                _drain(results, sink, bar)
            else:
                # fork: children inherit the loaded vocabulary, and nothing re-runs the parent's __main__
                methods = multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("fork" if "fork" in methods else None)
                with context.Pool(workers) as pool:
                    _drain(pool.imap(_encode_batch, batches), sink, bar)
        sink.close()
        produced = {name for name, _ in sink.written}
        for name, _ in sink.written:
            os.replace(staging / name, out / name)
        stale = re.compile(rf"{re.escape(prefix)}_(val|train)_\d{{6}}\.bin")
        for old in out.iterdir():
            if stale.fullmatch(old.name) and old.name not in produced:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):  # a failed run leaves no empty folder behind
            out.rmdir()
    return [(out / name, count) for name, count in sink.written]


def _drain(results, sink: _ShardSink, bar) -> None:
    docs = 0
    for count, tokens in results:
        docs += count
        sink.add(tokens)
        bar.update(tokens.size)
        bar.set_postfix(docs=docs, refresh=False)
