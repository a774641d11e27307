"""Distributed data loading from token shards.

The train stream is cut into sequences of seq_len + 1 tokens (inputs, then the same tokens shifted
by one as targets), shard by shard; a sequence never spans two shards. Step s's global batch is the
next batch_tokens / seq_len sequences of that stream whatever the world size W: with accumulation A
and micro-batches of B sequences, rank r's micro-step a takes the B sequences starting at
(a·W + r)·B, so the union over ranks and micro-steps is the same global batch for every (W, A).

shard_boundary says whether a batch may span two shards:
- "sequence": a batch may take the end of one shard and the start of the next.
- "batch" (the record's loader): a batch never spans two shards. In flat mode the batch at position
  pos of a shard is tokens[pos : pos + batch_tokens + 1] and is taken only if
  pos + batch_tokens + 1 < len(shard) (strictly: the record moves on when the sum is >=), then pos
  advances by batch_tokens; the rest of the shard is skipped. In BOS-aligned mode a batch takes its
  sequences from one shard, skipping to the next when fewer than a batch's worth remain.

Flat mode: sequence k of a shard starts at token offset + k·seq_len (in "batch" mode only as many as
fill whole batches by the rule above).
BOS-aligned mode: a sequence starts at a document's <|endoftext|> and runs on for seq_len + 1
tokens through as many documents as fit; the next sequence starts at the first document that begins
at or after this one's last target token. So no token is an input twice, and the tail of the last
document in each sequence (all of a document past seq_len tokens, for a long one) is skipped rather
than continued in a sequence that would not start with BOS.

Epoch 0 walks the shards in sorted order from offset 0, which reproduces the record's data order.
When the shards run out the stream wraps around; each later epoch e walks the shards in an order
and from a start offset below seq_len both drawn from (seed, e), so that a small corpus is not seen
in the same windows every epoch."""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speedrun.data import shards
from speedrun.data.tokenizer import EOT
from speedrun.errors import DataError, UsageError

STATE_VERSION = 1
SHARD_BOUNDARIES = ("batch", "sequence")


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


@dataclass
class _Shard:
    tokens: np.ndarray
    starts: np.ndarray  # start of every sequence this shard yields in its epoch


class TrainLoader:
    def __init__(self, files: list[str | Path], *, seq_len: int, micro_batch_seqs: int, batch_tokens: int,
                 rank: int = 0, world_size: int = 1, bos_aligned: bool = False,
                 device: torch.device | str | None = None, seed: int = 0, shard_boundary: str = "sequence"):
        if not files:
            raise DataError("no train shards given")
        if seq_len <= 0 or micro_batch_seqs <= 0 or batch_tokens <= 0:
            raise UsageError(f"seq_len ({seq_len}), micro_batch_seqs ({micro_batch_seqs}) and batch_tokens "
                             f"({batch_tokens}) must be positive")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        if shard_boundary not in SHARD_BOUNDARIES:
            raise UsageError(f"shard_boundary must be one of {', '.join(SHARD_BOUNDARIES)}; got '{shard_boundary}'")
        per_micro = seq_len * micro_batch_seqs * world_size
        if batch_tokens % per_micro:
            raise UsageError(f"batch_tokens ({batch_tokens}) is not divisible by seq_len {seq_len} × micro_batch_seqs "
                             f"{micro_batch_seqs} × world size {world_size}")
        self.files = [Path(f) for f in files]
        for f in self.files:
            shards.read_header(f)
        self.seq_len, self.micro_batch_seqs, self.batch_tokens = seq_len, micro_batch_seqs, batch_tokens
        self.rank, self.world_size = rank, world_size
        self.bos_aligned, self.seed, self.shard_boundary = bos_aligned, seed, shard_boundary
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grad_accum = batch_tokens // per_micro
        self.seqs_per_step = batch_tokens // seq_len
        self._epoch, self._shard, self._seq, self._step = 0, 0, 0, 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedrun-shards")
        self._loaded: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._usable: bool | None = None  # see _any_shard_usable

    # -- the stream -----------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[list[int], int]:
        if epoch == 0:
            return list(range(len(self.files))), 0
        rng = np.random.default_rng((self.seed, epoch))
        return [int(i) for i in rng.permutation(len(self.files))], int(rng.integers(self.seq_len))

    def _load(self, epoch: int, index: int) -> _Shard:
        order, offset = self._epoch_plan(epoch)
        tokens = shards.read_shard(self.files[order[index]])
        width = self.seq_len + 1
        if not self.bos_aligned:
            if isinstance(tokens.base, mmap.mmap) and hasattr(mmap, "MADV_WILLNEED"):
                tokens.base.madvise(mmap.MADV_WILLNEED)  # start reading the shard in before it is needed
            return _Shard(tokens, self._flat_starts(tokens.size, offset))
        bos = np.flatnonzero(tokens == EOT)
        following = np.searchsorted(bos, bos + self.seq_len).tolist()
        bos_list = bos.tolist()
        starts = []
        i = int(np.searchsorted(bos, offset))
        while i < len(bos_list) and bos_list[i] + width <= tokens.size:
            starts.append(bos_list[i])
            i = following[i]
        return _Shard(tokens, np.asarray(starts, dtype=np.int64))

    def _flat_starts(self, size: int, offset: int) -> np.ndarray:
        if self.shard_boundary == "sequence":
            return np.arange(offset, size - self.seq_len, self.seq_len, dtype=np.int64)
        # The record's rule keeps one token to spare (pos + B + 1 < size, not <=); matching it exactly
        # keeps our batches token for token the record's.
        batch = self.batch_tokens
        batches = len(range(offset, size - batch - 1, batch))
        return np.arange(offset, offset + batches * batch, self.seq_len, dtype=np.int64)

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

    def _take(self, count: int) -> list[tuple[np.ndarray, int]]:
        """The next `count` sequences of the global stream, as (shard tokens, start)."""
        taken: list[tuple[np.ndarray, int]] = []
        # In "batch" mode a shard with fewer than a whole batch left is skipped, so a batch is never split.
        need = count if self.shard_boundary == "batch" else 1
        empty_run = 0
        while len(taken) < count:
            shard = self._get(self._epoch, self._shard)
            available = shard.starts.size - self._seq
            if available < need:
                empty_run = 0 if shard.starts.size >= need else empty_run + 1
                # A run of empty shards can span epochs with unlucky offsets, so only epoch 0 proves none is usable.
                if empty_run > len(self.files) and not self._any_shard_usable(need):
                    raise DataError(f"no train shard holds {self._unit()} (first shard: {self.files[0]})")
                self._epoch, self._shard = self._next_position(self._epoch, self._shard)
                self._seq = 0
                continue
            n = min(available, count - len(taken))
            taken.extend((shard.tokens, int(s)) for s in shard.starts[self._seq:self._seq + n])
            self._seq += n
        return taken

    def _any_shard_usable(self, need: int) -> bool:
        """Whether some shard yields `need` sequences from offset 0. No later start yields more (flat:
        fewer windows fit; BOS: each sequence of the chain starts no earlier), so if none does, no epoch will."""
        if self._usable is None:
            self._usable = any(self._load(0, i).starts.size >= need for i in range(len(self.files)))
        return self._usable

    def _unit(self) -> str:
        """What a shard must hold to yield anything, for the error when none does."""
        if self.shard_boundary == "sequence":
            what = " starting at a document boundary" if self.bos_aligned else ""
            return f"a sequence of {self.seq_len + 1} tokens{what}"
        if self.bos_aligned:
            return (f"a batch of {self.batch_tokens} tokens ({self.seqs_per_step} sequences of {self.seq_len + 1} "
                    f"tokens, each starting at a document boundary)")
        return f"a batch of {self.batch_tokens + 1} tokens plus the spare token that shard_boundary = batch asks for"

    # -- public API -----------------------------------------------------------------------------

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next step: grad_accum pairs of (inputs, targets), each of
        shape (micro_batch_seqs, seq_len), int32 inputs and int64 targets, on the loader's device."""
        sequences = self._take(self.seqs_per_step)
        self._step += 1
        width, per = self.seq_len + 1, self.micro_batch_seqs
        batches = []
        for a in range(self.grad_accum):
            first = (a * self.world_size + self.rank) * per
            rows = _rows(self.device, per, width)
            view = rows.numpy()
            for i, (tokens, start) in enumerate(sequences[first:first + per]):
                view[i] = tokens[start:start + width]
            batches.append(_to_device(rows, self.device))
        return batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        return self._step

    def state_dict(self) -> dict:
        """The exact stream position, independent of rank and world size."""
        return {"version": STATE_VERSION, "step": self._step, "epoch": self._epoch, "shard": self._shard,
                "sequence": self._seq, "seed": self.seed, "seq_len": self.seq_len, "bos_aligned": self.bos_aligned,
                "shard_boundary": self.shard_boundary, "files": [f.name for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        problem = state_problem(state)
        if problem:
            raise DataError(f"data loader state is damaged ({problem})")
        mine = self.state_dict()
        state = {"shard_boundary": "sequence", **state}  # states saved before the option existed were "sequence"
        for key in ("seed", "seq_len", "bos_aligned", "shard_boundary"):
            if state[key] != mine[key]:
                raise UsageError(f"cannot resume the data stream: it was saved with {key} = {state[key]}, "
                                 f"this run has {mine[key]}")
        if state["files"] != mine["files"]:
            raise DataError(f"cannot resume the data stream: it was saved over {len(state['files'])} train shards "
                            f"({state['files'][0]} ...), this run found {len(mine['files'])} ({mine['files'][0]} ...)")
        self._step, self._epoch, self._shard, self._seq = (int(state[k]) for k in ("step", "epoch", "shard", "sequence"))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def state_problem(state) -> str | None:
    """What makes `state` unusable as a TrainLoader.state_dict() of this version, or None: the
    checks a checkpoint's loader position must pass before resuming from it."""
    if not isinstance(state, dict):
        return "the loader position is not a JSON object"
    if state.get("version") != STATE_VERSION:
        return f"loader state version {state.get('version')!r:.40}, expected {STATE_VERSION}"
    kinds = {"step": int, "epoch": int, "shard": int, "sequence": int, "seed": int, "seq_len": int,
             "bos_aligned": bool, "files": list}
    for key, kind in kinds.items():
        value = state.get(key)
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
