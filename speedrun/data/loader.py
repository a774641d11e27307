"""Distributed data loading from token shards.

Each step asks for a shape: seq_len T, batch_tokens and, in BOS-aligned mode, max_doc_len (the
arguments of `TrainLoader.next_batch`; those left out are the constructor's). The step takes the
next batch_tokens / T sequences of T + 1 tokens (inputs, then the same tokens shifted by one as
targets) of the train stream, whatever the world size W: with accumulation A = batch_tokens / (T·B·W)
and micro-batches of B sequences, rank r's micro-step a takes the B sequences starting at (a·W + r)·B,
so the union over ranks and micro-steps is the same global batch for every (W, A). A sequence never
spans two shards. The stream is walked by a cursor (epoch, shard, position) that does not depend on
the shape, so the shape may change at any step (a batch-size schedule).

Flat mode (bos_aligned = False): the position is a token offset p; the next sequence is
tokens[p : p + T + 1] and p then advances by T, so consecutive sequences share one token.

BOS-aligned mode (the 2026 record's packing): document i starts at the i-th <|endoftext|> (BOS) of
the shard, at b_i, and runs to b_{i+1} (the shard's end for the last one); the position is a
document index i. A sequence is a list of pieces, one per document: while it holds at most T
tokens, the piece tokens[b_i : e_i] with e_i = min(b_{i+1} or the shard's end, b_i + max_doc_len,
b_i + T + 1 - tokens so far) is appended and the cursor moves to document i + 1. So a sequence holds
exactly T + 1 tokens and every piece starts with a BOS, from which the model's document mask finds
the document boundaries (no cu_seqlens needed). A document longer than max_doc_len (0: no limit)
loses its tail, the last document of a sequence loses the rest that does not fit, and no document
is used twice. When a piece is needed and the shard has no BOS left, the sequence cannot be completed
from this shard. Tokens before a shard's first BOS are never used.

shard_boundary says what happens when the rest of a shard cannot give what a step asks:
- "sequence": a sequence that cannot be completed is taken from the next shard, so a batch may take
  the end of one shard and the start of the next. Flat: a sequence fits when p + T + 1 <= len(shard).
- "batch" (the record's loader): a step's batch never spans two shards; when its sequences cannot
  all be cut from the rest of the shard, that rest is skipped and the whole batch is taken from the
  next shard. Flat: the batch at p (tokens[p : p + batch_tokens + 1]) is taken only if
  p + batch_tokens + 1 < len(shard) (strictly: the record moves on when the sum is >=), so constant
  shapes give the 2025 record's batches token for token.
If no shard can give one step's batch (with "sequence": one sequence) even from its start, the loader
raises DataError rather than searching forever.

Epoch 0 walks the shards in sorted order from position 0 (token 0; the first document), which
reproduces the record's data order. When the shards run out the stream wraps around; each later
epoch e walks the shards in an order and from a token offset o below the constructor's seq_len, both
drawn from (seed, e), so that a small corpus is not seen in the same windows every epoch: flat mode
starts each shard at token o, BOS-aligned mode at the first document that begins at or after token o.

State (version 2): {version, step, epoch, shard, position, seed, seq_len, bos_aligned, max_doc_len,
shard_boundary, files}, where shard indexes the epoch's shard order, position is the cursor (a token
offset, or a document index) and seq_len and max_doc_len are the constructor's. It depends on neither
rank, world size nor step shape. Version 1 states stored the flat cursor as `sequence`, the count of
seq_len windows after the epoch's offset (position = o + sequence·seq_len); their BOS-aligned states
came from an older packing rule that no longer exists and are refused."""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from speedrun.data import shards
from speedrun.data.tokenizer import EOT
from speedrun.errors import DataError, UsageError

STATE_VERSION = 2
SHARD_BOUNDARIES = ("batch", "sequence")
# The keys of each state version besides `version`; a version-1 state may lack shard_boundary
# (saved before the option existed, it was "sequence").
_STATE_COMMON = {"step": int, "epoch": int, "shard": int, "seed": int, "seq_len": int, "bos_aligned": bool,
                 "files": list, "shard_boundary": str}
_STATE_KEYS = {1: {**_STATE_COMMON, "sequence": int}, 2: {**_STATE_COMMON, "position": int, "max_doc_len": int}}


def find_shards(data_dir: str | Path, train_pattern: str, val_pattern: str) -> tuple[list[Path], list[Path]]:
    """The sorted train and val shard files in `data_dir`."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (download FineWeb with `speedrun data fineweb --dir "
                        f"{folder}`, or tokenize your own with `speedrun data tokenize`)"
                        if not folder.exists() else f"{folder} is not a folder")
    found = []
    for kind, pattern in (("train", train_pattern), ("val", val_pattern)):
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not files:
            raise DataError(f"no {kind} shards matching '{pattern}' in {folder}")
        found.append(files)
    return found[0], found[1]


def _to_device(rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs int32, targets int64) from rows of seq_len + 1 tokens."""
    if device.type == "cuda":
        rows = rows.to(device, non_blocking=True)  # rows live in pinned memory: the copy runs asynchronously
    return rows[:, :-1].contiguous(), rows[:, 1:].to(torch.int64)


def _rows(device: torch.device, count: int, width: int) -> torch.Tensor:
    return torch.empty((count, width), dtype=torch.int32, pin_memory=device.type == "cuda")


class _Shape(NamedTuple):
    """What one step asks for."""
    seq_len: int
    batch_tokens: int
    max_doc_len: int


def _check_shape(shape: _Shape, micro_batch_seqs: int, world_size: int, bos_aligned: bool) -> None:
    seq_len, batch_tokens, max_doc_len = shape
    if seq_len <= 0 or micro_batch_seqs <= 0 or batch_tokens <= 0:
        raise UsageError(f"seq_len ({seq_len}), micro_batch_seqs ({micro_batch_seqs}) and batch_tokens "
                         f"({batch_tokens}) must be positive")
    if batch_tokens % (seq_len * micro_batch_seqs * world_size):
        raise UsageError(f"batch_tokens ({batch_tokens}) is not divisible by seq_len {seq_len} × micro_batch_seqs "
                         f"{micro_batch_seqs} × world size {world_size}")
    if max_doc_len < 0:
        raise UsageError(f"max_doc_len ({max_doc_len}) must be zero (no limit) or positive")
    if max_doc_len and not bos_aligned:
        raise UsageError(f"max_doc_len ({max_doc_len}) needs data.bos_aligned = true: flat sequences are not cut "
                         "into documents")


class _Sequence(NamedTuple):
    """One sequence of the stream: the pieces tokens[s : s + n] for (s, n) in zip(starts, lengths)."""
    tokens: np.ndarray
    starts: np.ndarray | tuple[int]
    lengths: np.ndarray | tuple[int]

    def fill(self, row: np.ndarray) -> None:
        at = 0
        for start, length in zip(self.starts, self.lengths):
            row[at:at + length] = self.tokens[start:start + length]
            at += length


@dataclass
class _Shard:
    tokens: np.ndarray
    first: int  # where this epoch's walk of the shard starts: a token offset, or a document index
    bos: np.ndarray | None = None  # BOS-aligned mode: where each document starts
    _pieces: dict = field(default_factory=dict)  # max_doc_len -> piece_lengths()

    def piece_lengths(self, max_doc_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(each document's length cut to max_doc_len, their running sum starting at 0): the running
        sum turns "how many documents fill a sequence" into one binary search."""
        if max_doc_len not in self._pieces:
            lengths = np.diff(self.bos, append=self.tokens.size)  # the last document runs to the shard's end
            if max_doc_len:
                np.minimum(lengths, max_doc_len, out=lengths)
            self._pieces[max_doc_len] = lengths, np.concatenate(([0], np.cumsum(lengths)))
        return self._pieces[max_doc_len]


def _cut_documents(shard: _Shard, doc: int, want: int, shape: _Shape) -> tuple[list[_Sequence], int]:
    """Up to `want` sequences packed from documents doc, doc + 1, ... of `shard` by the record's rule
    (module docstring), and the document after the last one used."""
    lengths, total = shard.piece_lengths(shape.max_doc_len)
    width = shape.seq_len + 1
    out: list[_Sequence] = []
    while len(out) < want and doc < lengths.size:
        # The sequence ends in the first document whose piece brings it to `width` tokens; none: the
        # shard runs out of documents first.
        last = int(np.searchsorted(total, total[doc] + width)) - 1
        if last >= lengths.size:
            break
        pieces = lengths[doc:last + 1].copy()
        pieces[-1] = width - (total[last] - total[doc])
        out.append(_Sequence(shard.tokens, shard.bos[doc:last + 1], pieces))
        doc = last + 1
    return out, doc


class TrainLoader:
    def __init__(self, files: list[str | Path], *, seq_len: int, micro_batch_seqs: int, batch_tokens: int,
                 rank: int = 0, world_size: int = 1, bos_aligned: bool = False,
                 device: torch.device | str | None = None, seed: int = 0, shard_boundary: str = "sequence",
                 max_doc_len: int = 0):
        if not files:
            raise DataError("no train shards given")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        if shard_boundary not in SHARD_BOUNDARIES:
            raise UsageError(f"shard_boundary must be one of {', '.join(SHARD_BOUNDARIES)}; got '{shard_boundary}'")
        _check_shape(_Shape(seq_len, batch_tokens, max_doc_len), micro_batch_seqs, world_size, bos_aligned)
        self.files = [Path(f) for f in files]
        for f in self.files:
            shards.read_header(f)
        self.seq_len, self.micro_batch_seqs, self.batch_tokens = seq_len, micro_batch_seqs, batch_tokens
        self.max_doc_len = max_doc_len
        self.rank, self.world_size = rank, world_size
        self.bos_aligned, self.seed, self.shard_boundary = bos_aligned, seed, shard_boundary
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grad_accum = batch_tokens // (seq_len * micro_batch_seqs * world_size)  # at the constructor's shape
        self._epoch, self._shard, self._pos, self._step = 0, 0, 0, 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedrun-shards")
        self._loaded: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._feasible: dict[tuple, bool] = {}  # see _check_feasible

    # -- the stream -----------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[list[int], int]:
        if epoch == 0:
            return list(range(len(self.files))), 0
        rng = np.random.default_rng((self.seed, epoch))
        return [int(i) for i in rng.permutation(len(self.files))], int(rng.integers(self.seq_len))

    def _load(self, epoch: int, index: int) -> _Shard:
        order, offset = self._epoch_plan(epoch)
        tokens = shards.read_shard(self.files[order[index]])
        if not self.bos_aligned:
            if isinstance(tokens.base, mmap.mmap) and hasattr(mmap, "MADV_WILLNEED"):
                tokens.base.madvise(mmap.MADV_WILLNEED)  # start reading the shard in before it is needed
            return _Shard(tokens, offset)
        bos = np.flatnonzero(tokens == EOT)  # reads the whole shard, here in the background thread
        return _Shard(tokens, int(np.searchsorted(bos, offset)), bos)

    def _next_position(self, epoch: int, index: int) -> tuple[int, int]:
        return (epoch, index + 1) if index + 1 < len(self.files) else (epoch + 1, 0)

    def _get(self, epoch: int, index: int) -> _Shard:
        with self._lock:
            key = (epoch, index)
            wanted = {key, self._next_position(*key)}
            for k in wanted:
                if k not in self._loaded:
                    self._loaded[k] = self._pool.submit(self._load, *k)
            future = self._loaded[key]
            for k in list(self._loaded):
                if k not in wanted and k < key:
                    del self._loaded[k]
        return future.result()

    def _next_shard(self) -> None:
        self._epoch, self._shard = self._next_position(self._epoch, self._shard)
        self._pos = self._get(self._epoch, self._shard).first

    def _cut(self, shard: _Shard, pos: int, want: int, shape: _Shape) -> tuple[list[_Sequence], int]:
        """Up to `want` sequences from position `pos` of `shard`, and the position after them. In
        "batch" mode the caller asks for the whole batch and uses nothing unless all of it came."""
        if self.bos_aligned:
            return _cut_documents(shard, pos, want, shape)
        size, seq_len = shard.tokens.size, shape.seq_len
        if self.shard_boundary == "batch":
            # The record's rule keeps one token to spare (pos + B + 1 < size, not <=); matching it exactly
            # keeps our batches token for token the record's.
            fits = want if pos + want * seq_len + 1 < size else 0
        else:
            fits = min(want, max(0, (size - pos - 1) // seq_len))
        out = [_Sequence(shard.tokens, (pos + k * seq_len,), (seq_len + 1,)) for k in range(fits)]
        return out, pos + fits * seq_len

    def _take(self, shape: _Shape) -> list[_Sequence]:
        """The sequences of the next step's global batch."""
        count = shape.batch_tokens // shape.seq_len
        whole = self.shard_boundary == "batch"
        taken: list[_Sequence] = []
        fruitless = 0  # shards in a row that gave nothing
        while True:
            shard = self._get(self._epoch, self._shard)
            got, pos = self._cut(shard, self._pos, count if whole else count - len(taken), shape)
            if whole and len(got) < count:
                got = []  # a batch never spans two shards: the rest of this one is skipped
            if got:
                taken += got
                self._pos, fruitless = pos, 0
            else:
                fruitless += 1
            if len(taken) == count:
                return taken
            if fruitless > len(self.files):
                self._check_feasible(shape, count if whole else 1)
            self._next_shard()

    def _check_feasible(self, shape: _Shape, need: int) -> None:
        """Raise if no shard gives `need` sequences of `shape` even from its start. A run of fruitless
        shards can span epochs with unlucky offsets, so only starts at 0 prove it: no later start
        gives more (flat: fewer windows fit; BOS: each sequence of the chain ends no earlier)."""
        key = (shape, need)
        if key not in self._feasible:
            self._feasible[key] = any(len(self._cut(self._load(0, i), 0, need, shape)[0]) == need
                                      for i in range(len(self.files)))
        if not self._feasible[key]:
            sizes = [shards.read_header(f) for f in self.files]
            largest = int(np.argmax(sizes))
            raise DataError(f"no train shard holds {self._unit(shape)} (the largest, {self.files[largest]}, has "
                            f"{sizes[largest]:,} tokens)")

    def _unit(self, shape: _Shape) -> str:
        """What a shard must hold to give anything, for the error when none does."""
        width = shape.seq_len + 1
        if self.shard_boundary == "sequence":
            what = " starting at a document boundary" if self.bos_aligned else ""
            return f"a sequence of {width} tokens{what}"
        if self.bos_aligned:
            cut = f" cut to {shape.max_doc_len} tokens" if shape.max_doc_len else ""
            return (f"a batch of {shape.batch_tokens // shape.seq_len} sequences of {width} tokens packed from "
                    f"documents{cut}")
        return f"a batch of {shape.batch_tokens + 1} tokens plus the spare token that shard_boundary = batch asks for"

    # -- public API -----------------------------------------------------------------------------

    def next_batch(self, seq_len: int | None = None, batch_tokens: int | None = None,
                   max_doc_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next step, of the shape given (None: the constructor's):
        batch_tokens / (seq_len · micro_batch_seqs · world_size) pairs of (inputs, targets), each of
        shape (micro_batch_seqs, seq_len), int32 inputs and int64 targets, on the loader's device."""
        shape = _Shape(self.seq_len if seq_len is None else seq_len,
                       self.batch_tokens if batch_tokens is None else batch_tokens,
                       self.max_doc_len if max_doc_len is None else max_doc_len)
        _check_shape(shape, self.micro_batch_seqs, self.world_size, self.bos_aligned)
        sequences = self._take(shape)
        self._step += 1
        per = self.micro_batch_seqs
        batches = []
        for a in range(len(sequences) // (per * self.world_size)):
            first = (a * self.world_size + self.rank) * per
            rows = _rows(self.device, per, shape.seq_len + 1)
            for row, sequence in zip(rows.numpy(), sequences[first:first + per]):
                sequence.fill(row)
            batches.append(_to_device(rows, self.device))
        return batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        return self._step

    def state_dict(self) -> dict:
        """The exact stream position, independent of rank, world size and step shape."""
        return {"version": STATE_VERSION, "step": self._step, "epoch": self._epoch, "shard": self._shard,
                "position": self._pos, "seed": self.seed, "seq_len": self.seq_len, "bos_aligned": self.bos_aligned,
                "max_doc_len": self.max_doc_len, "shard_boundary": self.shard_boundary,
                "files": [f.name for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if isinstance(state, dict) and not (type(version) is int and version in _STATE_KEYS):
            raise DataError(f"data loader state has version {version!r:.40}; this speedrun reads versions "
                            f"{' and '.join(map(str, _STATE_KEYS))}")
        problem = state_problem(state)
        if problem:
            raise DataError(f"data loader state is damaged ({problem})")
        # keys a version-1 state may lack: saved before the options existed, they were these
        state = {"shard_boundary": "sequence", "max_doc_len": 0, **state}
        mine = self.state_dict()
        for key in ("seed", "seq_len", "bos_aligned", "max_doc_len", "shard_boundary"):
            if state[key] != mine[key]:
                raise UsageError(f"cannot resume the data stream: it was saved with {key} = {state[key]}, "
                                 f"this run has {mine[key]}")
        if state["files"] != mine["files"]:
            raise DataError(f"cannot resume the data stream: it was saved over {len(state['files'])} train shards "
                            f"({state['files'][0]} ...), this run found {len(mine['files'])} ({mine['files'][0]} ...)")
        self._step, self._epoch, self._shard = (int(state[k]) for k in ("step", "epoch", "shard"))
        self._pos = self._state_position(state)

    def _state_position(self, state: dict) -> int:
        if state["version"] == STATE_VERSION:
            return int(state["position"])
        if self.bos_aligned:
            raise DataError("cannot resume the data stream: it was saved by the BOS-aligned loader of state version "
                            "1, whose packing (windows running on through uncut documents) this loader no longer has")
        return self._epoch_plan(self._epoch)[1] + int(state["sequence"]) * self.seq_len

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def state_problem(state) -> str | None:
    """What makes `state` unusable as a TrainLoader.state_dict() of a readable version, or None: the
    checks a checkpoint's loader position must pass before resuming from it."""
    if not isinstance(state, dict):
        return "the loader position is not a JSON object"
    version = state.get("version")
    if type(version) is not int or version not in _STATE_KEYS:
        return f"loader state version {version!r:.40}, expected one of {', '.join(map(str, _STATE_KEYS))}"
    kinds = _STATE_KEYS[version]
    unknown = sorted(map(str, set(state) - set(kinds) - {"version"}))
    if unknown:
        return f"loader has an unknown key {unknown[0]!r:.40}"
    for key, kind in kinds.items():
        value = state.get(key, "sequence" if key == "shard_boundary" and version == 1 else None)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0 and key != "seed")):
            return f"loader {key} is {value!r:.40}, expected {'a count' if kind is int else kind.__name__}"
    if not state["files"] or not all(isinstance(f, str) for f in state["files"]):
        return "loader files is not a list of shard names"
    if state["shard"] >= len(state["files"]):
        return f"loader shard {state['shard']} is beyond its {len(state['files'])} files"
    if state.get("shard_boundary", "sequence") not in SHARD_BOUNDARIES:
        return f"loader shard_boundary is {state.get('shard_boundary')!r:.40}"
    return None


def val_batches(files: list[str | Path], *, val_tokens: int, seq_len: int, rank: int = 0, world_size: int = 1,
                device: torch.device | str | None = None):
    """This rank's share of the validation set: the first val_tokens tokens of the val shards (read as
    one stream across shard boundaries; a remainder short of a whole sequence is left out), cut into
    sequences of seq_len. Rank r takes sequences r, r + W, ...; yields (inputs, targets) of shape
    (1, seq_len). The files are checked now, not on the first iteration."""
    if seq_len <= 0 or val_tokens < seq_len:
        raise UsageError(f"val_tokens ({val_tokens}) must hold at least one sequence of val_seq_len ({seq_len})")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside world size {world_size}")
    if not files:
        raise DataError("no val shards given")
    device = torch.device(device) if device is not None else torch.device("cpu")
    count = val_tokens // seq_len
    needed = count * seq_len + 1
    arrays = [shards.read_shard(f) for f in files]
    held = sum(a.size for a in arrays)
    if held < needed:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"the val shards hold {held:,} tokens, fewer than the {needed:,} that val_tokens {val_tokens:,} "
                        f"at seq_len {seq_len} needs: {names}")
    bounds = np.cumsum([0] + [a.size for a in arrays])

    def read(start: int, length: int, out: np.ndarray) -> None:
        i = int(np.searchsorted(bounds, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(bounds[i])
            piece = arrays[i][local:local + length - filled]
            out[filled:filled + piece.size] = piece
            filled += piece.size
            i += 1

    def generate():
        for k in range(rank, count, world_size):
            rows = _rows(device, 1, seq_len + 1)
            read(k * seq_len, seq_len + 1, rows.numpy()[0])
            yield _to_device(rows, device)

    return generate()


def val_fingerprint(files: list[str | Path], *, val_tokens: int, seq_len: int) -> dict:
    """Identifies the exact validation tokens, so that runs validated on different data are never
    compared as if they were repeats (`speedrun record`)."""
    import hashlib

    needed = (val_tokens // seq_len) * seq_len + 1
    digest = hashlib.sha256()
    for f in files:
        piece = shards.read_shard(f)[:needed]
        digest.update(piece.tobytes())
        needed -= piece.size
        if needed <= 0:
            break
    return {"sha256": digest.hexdigest(), "tokens": (val_tokens // seq_len) * seq_len}
