"""`speedrun eval`: HellaSwag accuracy and the loss and bits per byte on a set of token shards, for
a run, checkpoint or export folder, with the attention window the run ended with.

HellaSwag is scored as llm.c and build-nanogpt do: each of the 4 endings is appended to the context
and scored by the cross-entropy of its own tokens; the prediction is the ending with the lowest
mean (acc_norm, the headline number) or the lowest sum (acc). Unlike them, the context starts with
<|endoftext|>, the document start these models were trained with."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from speedrun.data.corpus import cache_root
from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import DataError, UsageError, first_line
from speedrun.loading import final_window, load_model
from speedrun.model import GPT
from speedrun.prepare import prepare

# The validation split as the hub's own Parquet conversion of the dataset (a branch every dataset
# repo with a viewer has), so no dataset-loading script runs and `datasets` is not needed.
HELLASWAG_REPO = "Rowan/hellaswag"
HELLASWAG_REVISION = "refs/convert/parquet"
HELLASWAG_PARQUET = "default/validation/0000.parquet"
HELLASWAG_ITEMS = 10042


def hellaswag_cache() -> Path:
    return cache_root() / "hellaswag" / "hellaswag_val.jsonl"


def fetch_hellaswag() -> Path:
    """The validation split as JSON lines in the original release's schema (hellaswag_val.jsonl:
    ctx, endings, integer label, ...), downloaded once into the cache."""
    path = hellaswag_cache()
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download
    from pyarrow import parquet

    from speedrun.data.fineweb import check_reachable

    try:
        check_reachable(HELLASWAG_REPO, HELLASWAG_PARQUET, HELLASWAG_REVISION)
    except DataError as e:
        raise DataError(f"HellaSwag is not cached at {path} and cannot be downloaded: {e}; "
                        f"or pass --data FILE (hellaswag_val.jsonl)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        try:
            downloaded = hf_hub_download(HELLASWAG_REPO, HELLASWAG_PARQUET, repo_type="dataset",
                                         revision=HELLASWAG_REVISION, local_dir=tmp)
            rows = parquet.read_table(downloaded).to_pylist()
        except Exception as e:
            raise DataError(f"download of {HELLASWAG_REPO}/{HELLASWAG_PARQUET} failed "
                            f"({type(e).__name__}: {first_line(e)})") from None
        if len(rows) != HELLASWAG_ITEMS:
            raise DataError(f"{HELLASWAG_REPO}/{HELLASWAG_PARQUET} holds {len(rows)} items, expected {HELLASWAG_ITEMS}")
        staged = Path(tmp) / path.name
        # the hub's copy stores labels as strings; the original file, and this one, as integers
        staged.write_text("".join(json.dumps({**row, "label": int(row["label"])}) + "\n" for row in rows))
        os.replace(staged, path)
    return path


def read_hellaswag(path: str | Path) -> list[tuple[str, list[str], int]]:
    """(context, 4 endings, index of the right one) per line of a hellaswag_val.jsonl-style file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ctx, endings, label = row["ctx"], row["endings"], int(row["label"])
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError):  # OverflowError: label Infinity
            raise DataError(f"{path}:{n}: not a HellaSwag item (a JSON object with ctx, endings and label)") from None
        if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) for e in endings) and 0 <= label < 4):
            raise DataError(f"{path}:{n}: a HellaSwag item needs a string ctx, 4 string endings and a label 0-3")
        items.append((ctx, endings, label))
    if not items:
        raise DataError(f"{path}: holds no HellaSwag items")
    return items


@torch.no_grad()
def ending_losses(model: GPT, ctx: str, endings: list[str], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) over each ending's tokens of their cross-entropy given <|endoftext|>, the context
    and the ending's earlier tokens; one forward pass of the endings as a right-padded batch."""
    enc = gpt2()
    context = [EOT] + enc.encode_ordinary(ctx)
    ends = [enc.encode_ordinary(" " + e) for e in endings]
    device = next(model.parameters()).device
    rows = torch.zeros(len(ends), len(context) + max(map(len, ends)), dtype=torch.long)
    scored = torch.zeros_like(rows, dtype=torch.bool)
    for i, end in enumerate(ends):
        rows[i, :len(context) + len(end)] = torch.tensor(context + end)
        scored[i, len(context):len(context) + len(end)] = True
    rows, scored = rows.to(device), scored.to(device)
    targets = rows[:, 1:]
    logits = model(rows[:, :-1], **window.kwargs())
    # over (N, vocab) rows: CPU's kernel for the (B, vocab, T) layout sums less accurately, by ~1e-4
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    total = (ce * scored[:, 1:]).sum(1)
    return total, total / scored.sum(1)


def hellaswag(path: str, data: str | None = None, limit: int | None = None, device: str = "auto") -> dict:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    cfg, model = load_model(path, device)
    prepare(model, cfg, next(model.parameters()).device, "inference")
    data_path = Path(data) if data is not None else fetch_hellaswag()
    items = read_hellaswag(data_path)[:limit]
    window = final_window(cfg)
    right_norm = right_sum = 0
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=len(items), unit="item", dynamic_ncols=True)
    for ctx, endings, label in items:
        total, mean = ending_losses(model, ctx, endings, window)
        right_norm += int(mean.argmin()) == label
        right_sum += int(total.argmin()) == label
        if progress is not None:
            progress.update(1)
            progress.set_postfix(acc_norm=f"{right_norm / progress.n:.4f}")
    if progress is not None:
        progress.close()
    return {"items": len(items), "acc_norm": right_norm / len(items), "acc": right_sum / len(items),
            "data": str(data_path)}


@functools.cache
def token_bytes() -> torch.Tensor:
    """UTF-8 length of every token id; <|endoftext|> only separates documents, so it counts 0."""
    enc = gpt2()
    return torch.tensor([len(enc.decode_single_token_bytes(t)) for t in range(EOT)] + [0])


@torch.no_grad()
def loss_sums(forward, batches, windows: dict, device: torch.device) -> torch.Tensor:
    """The loss summed over every target token of `batches` (each batch's mean loss times its
    token count), and the token count, as one float64 tensor on `device`. Sums rather than a mean,
    so that ranks' shares add up in one all-reduce; nothing here waits for the device. `windows`:
    the forward's window arguments (Windows.kwargs())."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, targets in batches:
        loss = forward(inputs, targets, **windows)
        sums[0] += loss.double() * targets.numel()
        sums[1] += targets.numel()
    return sums


@torch.no_grad()
def shard_loss(path: str, data: str, tokens: int | None = None, seq_len: int | None = None, pattern: str | None = None,
               device: str = "auto") -> dict:
    """Mean cross-entropy and bits per byte over the first `tokens` tokens of the shards in `data`
    matching `pattern`, cut into sequences of `seq_len` as training's validation does (defaults: the
    run's val_tokens, val_seq_len and val_pattern), so on the run's own val shards the loss is its
    final val_loss."""
    from speedrun.data.loader import val_batches

    for flag, value in (("--tokens", tokens), ("--seq-len", seq_len)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    cfg, model = load_model(path, device)
    tokens = cfg.data.val_tokens if tokens is None else tokens
    seq_len = cfg.data.val_seq_len if seq_len is None else seq_len
    pattern = pattern or cfg.data.val_pattern
    if cfg.model.positional == "learned" and seq_len > cfg.model.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the {cfg.model.max_seq_len} positions this model has learned")
    if tokens < seq_len:
        raise UsageError(f"{tokens:,} tokens hold no whole sequence of {seq_len:,} (--tokens, --seq-len)")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"no shards matching '{pattern}' in {folder}")
    device = next(model.parameters()).device
    forward = prepare(model, cfg, device, "eval")
    window = final_window(cfg)
    byte_counts = token_bytes().to(device)
    n_bytes = torch.zeros((), dtype=torch.long, device=device)

    # tallied as the batches go by, on the device: the shards are read once and nothing waits
    def counting_bytes(batches):
        for inputs, targets in batches:
            n_bytes.add_(byte_counts[targets].sum())
            yield inputs, targets

    batches = counting_bytes(val_batches(files, val_tokens=tokens, seq_len=seq_len, device=device))
    nats, count = loss_sums(forward, batches, window.kwargs(), device).tolist()
    n_bytes = int(n_bytes)
    return {"loss": nats / count, "bits_per_byte": nats / math.log(2) / n_bytes, "tokens": int(count),
            "bytes": n_bytes, "shards": [str(f) for f in files]}


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model (HellaSwag, loss on shards)",
                       description="Evaluate the newest checkpoint of a run, a checkpoint or an export folder.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    h = tasks.add_parser("hellaswag", help="HellaSwag validation accuracy (10,042 items)",
                         description=f"HellaSwag validation accuracy by completion likelihood. The data is "
                                     f"{HELLASWAG_REPO} from the Hugging Face hub, downloaded once into "
                                     f"$SPEEDRUN_CACHE/hellaswag/, or a local hellaswag_val.jsonl-style file.")
    h.add_argument("--data", metavar="FILE", help="a JSON-lines file of items (ctx, endings, label) instead of the hub's")
    h.add_argument("--limit", type=int, help="score only the first N items")
    h.set_defaults(func=_cmd_hellaswag)
    loss = tasks.add_parser("loss", help="loss and bits per byte on token shards",
                            description="Mean cross-entropy and bits per byte (cross-entropy in bits over the UTF-8 "
                                        "bytes of the target tokens; <|endoftext|> counts 0 bytes) on .bin shards.")
    loss.add_argument("--data", metavar="DIR", required=True, help="folder of .bin token shards")
    loss.add_argument("--tokens", type=int, help="tokens to evaluate (default: the run's data.val_tokens)")
    loss.add_argument("--seq-len", type=int, help="sequence length (default: the run's data.val_seq_len)")
    loss.add_argument("--pattern", help="shard file glob (default: the run's data.val_pattern, e.g. '*_val_*.bin')")
    loss.set_defaults(func=_cmd_loss)
    for task in (h, loss):
        task.add_argument("path", metavar="RUN_DIR|CKPT", help="a run directory (its newest checkpoint), a checkpoint "
                                                               "directory or a folder written by `speedrun export`")
        task.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        task.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _cmd_hellaswag(args: argparse.Namespace) -> int:
    result = hellaswag(args.path, args.data, args.limit, args.device)
    print(json.dumps(result) if args.json else
          f"hellaswag: {result['items']:,} items  acc_norm {result['acc_norm']:.4f}  acc {result['acc']:.4f}")
    return 0


def _cmd_loss(args: argparse.Namespace) -> int:
    result = shard_loss(args.path, args.data, args.tokens, args.seq_len, args.pattern, args.device)
    print(json.dumps(result) if args.json else
          f"loss {result['loss']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
          f"({result['tokens']:,} tokens, {result['bytes']:,} bytes, {len(result['shards'])} shards)")
    return 0
