"""Attention masks, the attention backends (BACKENDS: FlexAttention and SDPA), and the 2026
record's extra attention pieces as functions.

Which keys a query sees: key position <= query position, (with `document_mask`) the same
document, where a document starts at each BOS token, and a sliding window in one of three
granularities (ModelConfig.window_granularity):
- "block", the record's: with n = window // window_block blocks (n // 2 on S layers, never fewer
  than one), a query in block i sees keys in blocks i - n + 1 .. i;
- "token": query - key < window (window / 2 on S layers);
- "varlen", the 2026 record's FlashAttention window_size=(window, 0): query - key <= window
  (window / 2 on S layers).
Where a schedule gives the S layers their own window (the 2026 stages), they use it unshrunk.
Both backends apply exactly this rule: FlexAttention through block-sparse masks (`BlockMask`), the
SDPA fallback through a dense boolean mask or, for a window that reaches at most a quarter of the
sequence back, by chunks of queries against only the keys they can reach (`BandedMask`). Masks are built once per forward pass, one for the
long window and one for the short, and shared by all layers. CPU and MPS always take the SDPA
path (see `use_flex`).

Paired-head layers (2026 record, A3) attend over 2T rows, two per token (see
speedrun.rotary.to_pair_rows), with masks of their own (`build_masks(..., paired=True)`). The
other pieces work on (B, T, H, D) tensors around the attention call: the partial key offset
(A4), XSA (A6) and the post-softmax composable attention (A8).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from speedrun.config import ModelConfig
from speedrun.data.tokenizer import EOT

NO_WINDOW = 1 << 30  # a window longer than any sequence
# mask_rule's `block` for the varlen rule; an int there is the block rule, None the token rule
VARLEN = "varlen"


def window_tokens(step: int, total_steps: int, cfg: ModelConfig) -> int:
    """The long attention window at `step` of a `total_steps` run, always whole window_blocks, so
    FlexAttention's block sparsity changes in steps (see ModelConfig.window_schedule)."""
    if not cfg.sliding_window:
        return NO_WINDOW
    step, total, block = min(max(step, 0), total_steps), max(total_steps, 1), cfg.window_block
    # integer ceil-divisions, so the value never depends on float rounding
    if cfg.window_schedule == "record":
        # (window_max - block/2)·step/total rounded up to whole blocks, written over 2·total·block
        blocks = -(-(2 * cfg.window_max - block) * step // (2 * total * block))
        return max(blocks, 1) * block
    window = cfg.window_min + -(-(cfg.window_max - cfg.window_min) * step // total)
    return -(-window // block) * block


def document_ids(idx: Tensor) -> Tensor:
    """(B, T) tokens -> (B, T) ids that increase by one at every BOS (EOT, which the data puts at
    the start of every document)."""
    return (idx == EOT).cumsum(-1)


# How much each long_short_pattern letter divides the window by: S layers see half of it.
SHRINK = {"L": 1, "S": 2}


class Windows(NamedTuple):
    """The long window and, where a schedule sets it, the S layers' own (else the long one halved), in tokens."""
    long: int
    short: int | None = None

    def kwargs(self) -> dict:
        """As GPT.forward's keyword arguments."""
        return {"window_tokens": self.long, "short_window": self.short}


def letter_windows(window: int | Tensor, short: int | Tensor | None = None) -> dict[str, tuple]:
    """(window, shrink) per long_short_pattern letter: S layers see the long window shrunk by
    SHRINK["S"], or exactly `short` tokens when a schedule gives the short window itself (the 2026
    record's stages)."""
    shrunk = {letter: (window, shrink) for letter, shrink in SHRINK.items()}
    return shrunk if short is None else {**shrunk, "S": (short, 1)}


def window_blocks(window: int | Tensor, block: int, shrink: int) -> int | Tensor:
    """Key blocks a query block sees under the block rule: (window // block) // shrink, at least 1."""
    n = window // block // shrink
    return torch.clamp_min(n, 1) if isinstance(n, Tensor) else max(n, 1)


def _within(distance, window: int | Tensor, shrink: int, inclusive: bool):
    """distance <= window / shrink (varlen) or < (token rule), as integer products (see mask_rule)."""
    return distance * shrink <= window if inclusive else distance * shrink < window


def mask_rule(docs: Tensor | None, window: int | Tensor, shrink: int = 1, block: int | str | None = None):
    """The mask_mod (b, h, q, kv) -> keep? shared by both backends; `block` None is the token rule
    q - kv < window / shrink, VARLEN the varlen rule q - kv <= window / shrink, a block size the
    block rule (see the module docstring).

    `window` may be a 0-d tensor on the model's device, so a compiled model need not recompile as
    the window grows. The rules compare integer products with the window itself rather than a
    window tensor divided inside the graph: a scalar tensor computed in the graph and captured by
    a mask_mod makes Inductor's CPU FlexAttention kernel fail to lower (torch 2.13). For the block
    rule, d = q // block - kv // block < max((window // block) // shrink, 1) is the same as
    d == 0 or (d + 1) * shrink * block <= window."""

    def keep(b, h, q, kv):
        if isinstance(block, int):
            d = q // block - kv // block
            allowed = (q >= kv) & ((d == 0) | ((d + 1) * (shrink * block) <= window))
        else:
            allowed = (q >= kv) & _within(q - kv, window, shrink, block == VARLEN)
        if docs is not None:
            allowed = allowed & (docs[b, q] == docs[b, kv])
        return allowed

    return keep


def dense_mask(docs: Tensor | None, window: int | Tensor, shrink: int, batch: int, seq_len: int, device,
               block: int | str | None = None) -> Tensor:
    """(B or 1, 1, T, T) boolean mask for SDPA, True where attention is allowed."""
    pos = torch.arange(seq_len, device=device)
    b = torch.arange(batch if docs is not None else 1, device=device)[:, None, None, None]
    return mask_rule(docs, window, shrink, block)(b, 0, pos[:, None], pos[None, :])


def _block_bounds(docs: Tensor | None, seq_len: int, block: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """For every (query block, key block): whether some pair in it is document-causal, whether every
    pair is, and the distance in blocks. Doc ids never decrease, so a block's first and last ids
    bound every id in it; a diagonal block always holds some future keys, so it is never "every"."""
    n = seq_len // block
    blk = torch.arange(n, device=device)
    gap = blk[:, None] - blk[None, :]
    some, every = (gap >= 0)[None], (gap > 0)[None]
    if docs is not None:
        lo, hi = docs[:, ::block], docs[:, block - 1::block]
        lo_q, hi_q, lo_kv, hi_kv = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
        some = some & (lo_q <= hi_kv) & (hi_q >= lo_kv)
        every = every & (lo_q == hi_q) & (lo_kv == hi_kv) & (lo_q == lo_kv)
    return some, every, gap


def _as_ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q, KV) boolean block grid -> BlockMask's (count, indices) form: the selected key blocks
    nearest the query first (highest index first), then the others, so that lowering a count
    keeps the nearest blocks."""
    # Each block's place is counted rather than sorted: on CUDA, Inductor lowers a sort to Triton,
    # and a compiled model whose masks were built with argsort missed its reference by 0.7 in the
    # logits (torch 2.11, H200) while masks built eagerly matched, the sort the likely cause
    # (docs/benchmarks.md); torch's own BlockMask code keeps its argsort out of Inductor.
    n = blocks.size(-1)
    kv = torch.arange(n, device=blocks.device, dtype=torch.int32)
    selected = blocks.to(torch.int32)
    count = selected.sum(-1, dtype=torch.int32)
    later = count[..., None] - selected.cumsum(-1, dtype=torch.int32)  # selected blocks with a higher index
    place = torch.where(blocks, later, count[..., None] + (n - 1 - kv) - later)
    indices = torch.empty_like(place).scatter_(-1, place.long(), kv.expand_as(place).contiguous())
    return count[:, None].contiguous(), indices[:, None].contiguous()


def flex_masks(docs: Tensor | None, window: int | Tensor, seq_len: int, block: int, device,
               granularity: str = "block", short: int | Tensor | None = None) -> dict[str, BlockMask]:
    """A BlockMask per long_short_pattern letter (see letter_windows), built from block-level bounds rather than by evaluating the
    rule on every (q, kv) pair: a block pair is skipped when no pair in it is allowed, "full" when
    every pair is (no mask_mod call inside), and partial otherwise. Cost is O(B * (T/block)^2)
    elementwise ops, all tensor code, so it compiles and never syncs with the host.

    Block granularity builds the lists once and then, per letter, keeps the nearest n - 1 full
    blocks and as many nearest partial ones as fill n (at least the diagonal one), as the record
    does. Its mask_mod repeats the window only for eager flex_attention, which ignores the lists.
    The token and varlen granularities classify each block pair by its nearest and farthest
    (q, kv) distance."""
    some, every, gap = _block_bounds(docs, seq_len, block, device)
    masks = {}
    if granularity == "block":
        partial_count, partial_index = _as_ordered(some & ~every)
        full_count, full_index = _as_ordered(every)
        for letter, (size, shrink) in letter_windows(window, short).items():
            n = window_blocks(size, block, shrink)
            partial = torch.minimum(partial_count, torch.clamp_min(n - full_count, 1))
            masks[letter] = BlockMask.from_kv_blocks(partial, partial_index, torch.clamp_max(full_count, n - 1),
                                                     full_index, BLOCK_SIZE=block,
                                                     mask_mod=mask_rule(docs, size, shrink, block),
                                                     seq_lengths=(seq_len, seq_len))
        return masks
    gap = gap * block  # distance between the blocks' first positions, in tokens
    inclusive = granularity == VARLEN
    rule = VARLEN if inclusive else None
    for letter, (size, shrink) in letter_windows(window, short).items():
        full = every & _within(gap + block - 1, size, shrink, inclusive)
        partial = some & _within(gap - block + 1, size, shrink, inclusive) & ~full
        masks[letter] = BlockMask.from_kv_blocks(*_as_ordered(partial), *_as_ordered(full), BLOCK_SIZE=block,
                                                 mask_mod=mask_rule(docs, size, shrink, rule),
                                                 seq_lengths=(seq_len, seq_len))
    return masks


def _flex_runs(cfg: ModelConfig, seq_len: int, device: torch.device) -> bool:
    """Whole blocks, and not CPU or MPS: there FlexAttention has no backward, and its unfused eager
    form is ~3x slower than SDPA's."""
    return seq_len % cfg.window_block == 0 and device.type not in ("cpu", "mps")


def _flex_masks(docs: Tensor | None, window: int | Tensor, short, cfg: ModelConfig, batch: int, seq_len: int, device):
    return flex_masks(docs, window, seq_len, cfg.window_block, device, cfg.window_granularity, short)


def _sdpa_masks(docs: Tensor | None, window: int | Tensor, short, cfg: ModelConfig, batch: int, seq_len: int, device):
    if docs is None and not cfg.sliding_window:
        return {"L": None, "S": None}  # is_causal: no mask to build or read
    block = window_rule_block(cfg)
    return {letter: _sdpa_mask(docs, size, shrink, batch, seq_len, device, block, cfg.window_block)
            for letter, (size, shrink) in letter_windows(window, short).items()}


@dataclass(frozen=True)
class BandedMask:
    """SDPA over a sliding window by query chunks: chunk c's `chunk` queries against the `span`
    positions c·chunk - span + chunk .. (c + 1)·chunk - 1 (see _key_windows), with `allowed`
    (B or 1, n, chunk, span) saying which of them each query sees; padding before position 0 is
    never allowed."""
    allowed: Tensor
    chunk: int
    span: int


# A banded mask where a query sees at most this fraction of the sequence back. Measured on a 2-core
# CPU (bf16, T = 1,024, 2 heads of 64, chunks of 128, forward and backward, docs/benchmarks.md):
# 1.9x faster than the dense mask at a 128-token window, 1.4x at 256, 1.1x at 384, slower at 512.
BANDED_MAX_REACH = 1 / 4


def _sdpa_mask(docs: Tensor | None, window: int | Tensor, shrink: int, batch: int, seq_len: int, device,
               block: int | str | None, chunk: int) -> Tensor | BandedMask:
    """The dense (B or 1, 1, T, T) mask, or where the window is short and the sequence whole chunks,
    a BandedMask: attention over a short window then computes only the scores it can keep."""
    # a compiled model keeps the dense mask: one graph for every window
    reach = None if torch.compiler.is_compiling() or seq_len % chunk else farthest_key(int(window), shrink, block)
    if reach is None or reach - 1 > BANDED_MAX_REACH * seq_len:
        return dense_mask(docs, window, shrink, batch, seq_len, device, block)
    chunks = seq_len // chunk
    start = torch.arange(chunks, device=device)[:, None, None] * chunk
    q = start + torch.arange(chunk, device=device)[:, None]  # (n, chunk, 1)
    kv = start - reach + 1 + torch.arange(chunk + reach - 1, device=device)  # (n, 1, span)
    b = torch.arange(batch if docs is not None else 1, device=device)[:, None, None, None]
    allowed = mask_rule(docs, window, shrink, block)(b, 0, q, kv.clamp(min=0)) & (kv >= 0)
    return BandedMask(allowed, chunk, chunk + reach - 1)


def _banded_attend(q: Tensor, k: Tensor, v: Tensor, mask: BandedMask, scale: float) -> Tensor:
    B, H, T, D = q.shape
    n = T // mask.chunk
    reach = mask.span - mask.chunk + 1

    def batched(x: Tensor) -> Tensor:  # (B, H, n, rows, D) -> (B·n, H, rows, D)
        return x.movedim(2, 1).flatten(0, 1)

    y = F.scaled_dot_product_attention(
        batched(_query_chunks(q, mask.chunk, n)), batched(_key_windows(k, mask.chunk, n, reach)),
        batched(_key_windows(v, mask.chunk, n, reach)),
        attn_mask=mask.allowed.expand(B, -1, -1, -1).flatten(0, 1)[:, None], scale=scale)
    return y.unflatten(0, (B, n)).movedim(1, 2).flatten(2, 3)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex_attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Tensor:
    # Eager flex_attention materialises every (T, T) score; a CUDA model that is not compiled as a
    # whole (--no-compile) still gets the fused kernel by compiling this call alone.
    eager = torch.compiler.is_compiling() or not q.is_cuda
    return (flex_attention if eager else _compiled_flex_attention())(q, k, v, block_mask=mask, scale=scale)


def _sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BandedMask | None, scale: float) -> Tensor:
    if isinstance(mask, BandedMask):
        return _banded_attend(q, k, v, mask, scale)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@dataclass(frozen=True)
class Backend:
    """An attention implementation: whether it runs for a sequence length on a device, the masks of
    one forward pass (keyed by SHRINK letter; any object the backend's `attend` takes), which of
    those it owns, and the attention itself over (B, H, T, D) tensors."""
    runs: Callable[[ModelConfig, int, torch.device], bool]
    masks: Callable[..., dict]
    owns: Callable[[object], bool]
    attend: Callable[[Tensor, Tensor, Tensor, object, float], Tensor]


# ModelConfig.attention names one; a new kernel is one entry. SDPA runs everywhere and takes over
# where the configured one cannot run; a KV cache's masks (dense) are SDPA's too.
BACKENDS = {
    "flex": Backend(_flex_runs, _flex_masks, lambda mask: isinstance(mask, BlockMask), _flex_attend),
    "sdpa": Backend(lambda cfg, seq_len, device: True, _sdpa_masks,
                    lambda mask: mask is None or isinstance(mask, (Tensor, BandedMask)), _sdpa_attend),
}
FALLBACK = "sdpa"


def attention_backend(cfg: ModelConfig, seq_len: int, device: torch.device) -> str:
    """The backend a forward pass of `seq_len` tokens on `device` uses."""
    return cfg.attention if BACKENDS[cfg.attention].runs(cfg, seq_len, device) else FALLBACK


def use_flex(cfg: ModelConfig, seq_len: int, device: torch.device) -> bool:
    return attention_backend(cfg, seq_len, device) == "flex"


def build_masks(idx: Tensor, window: int | Tensor, cfg: ModelConfig, short: int | Tensor | None = None,
                paired: bool = False) -> dict:
    """Masks for one forward pass, keyed by long_short_pattern letter, in the form of the backend
    that runs it: a BlockMask (flex), a dense boolean mask or None for plain causal (sdpa). `short`,
    when given, is the S layers' window in tokens; otherwise they see the long window halved.
    `paired`: the masks of paired-head layers, over the 2T rows of rotary.to_pair_rows: the same
    rules with row r in token r // 2's document and the window counted in rows."""
    B, T = idx.shape
    docs = document_ids(idx) if cfg.document_mask else None
    if paired:
        T *= 2
        docs = None if docs is None else docs.repeat_interleave(2, dim=1)
    return BACKENDS[attention_backend(cfg, T, idx.device)].masks(docs, window, short, cfg, B, T, idx.device)


def window_rule_block(cfg: ModelConfig) -> int | str | None:
    """The `block` argument of `mask_rule` for this config: the block size, None for the token rule
    or VARLEN."""
    if cfg.window_granularity == "block":
        return cfg.window_block
    return VARLEN if cfg.window_granularity == VARLEN else None


def farthest_key(window: int, shrink: int, block: int | str | None) -> int:
    """How many positions back, at most, a query can see, plus one: what a KV cache must hold."""
    if isinstance(block, int):
        return window_blocks(window, block, shrink) * block
    return window // shrink + 1 if block == VARLEN else -(-window // shrink)


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """Attention over (B, H, T, D) tensors by the backend whose mask `mask` is (see build_masks)."""
    for backend in BACKENDS.values():
        if backend.owns(mask):
            return backend.attend(q, k, v, mask, scale)
    raise TypeError(f"no attention backend takes a mask of type {type(mask).__name__}")


def key_offset(k: Tensor) -> Tensor:
    """(B, T, H, D) keys after rotary -> keys whose dims D/2 .. D - 1 (the unrotated ones) at
    position t >= 1 come from position t - 1 (2026 record, A4): a query matching them finds the
    token after an earlier match, an induction head in one layer. Position 0 keeps its own."""
    half = k.size(-1) // 2
    previous = torch.cat([k[:, :1, :, half:], k[:, :-1, :, half:]], dim=1)
    return torch.cat([k[..., :half], previous], dim=-1)


def xsa(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """Gated XSA (2026 record, A6): y, v (B, T, H, D), alpha (B, T, H) -> y minus tanh(alpha) times
    its projection on the query position's own value, per head."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).type_as(y)[..., None] * along * v


def _query_chunks(x: Tensor, chunk: int, chunks: int) -> Tensor:
    """(B, H, T, ...) -> (B, H, n, chunk, ...), zero padded at the end to n whole chunks."""
    pad = chunks * chunk - x.size(2)
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (chunks, chunk))


def _key_windows(x: Tensor, chunk: int, chunks: int, window: int) -> Tensor:
    """(B, H, T, ...) -> (B, H, n, chunk + window - 1, ...): for query chunk c, positions
    c·chunk - window + 1 .. (c + 1)·chunk - 1, zero padded outside 0 .. T - 1."""
    # whole chunks joined side by side, not Tensor.unfold: the same values, and the backward (sums of
    # shifted slices) takes half the time of unfold's on 2 CPU cores (docs/benchmarks.md)
    back = -(-(window - 1) // chunk)  # whole chunks a window reaches before its own
    x = _query_chunks(F.pad(x, (0, 0) * (x.dim() - 3) + (back * chunk, 0)), chunk, chunks + back)
    joined = torch.cat([x[:, :, j:j + chunks] for j in range(back + 1)], dim=3)
    return joined[:, :, :, (back + 1) * chunk - (chunk + window - 1):]


def _composable_allowed(docs: Tensor | None, seq_len: int, chunk: int, chunks: int, window: int, device) -> Tensor:
    """(B or 1, 1, n, chunk, chunk + window - 1): whether query a of chunk c sees key i of its
    window (see _key_windows). Their distance a + window - 1 - i must lie in [0, window) and both
    be in one document; padding gets a document of its own, so every row, padded ones included,
    sees at least itself (no all-masked softmax row, whose NaNs would leak into the gradients)."""
    if docs is None:
        docs = torch.zeros(1, seq_len, dtype=torch.int64, device=device)
    a = torch.arange(chunk, device=device)[:, None]
    i = torch.arange(chunk + window - 1, device=device)[None, :]
    near = (a + window - 1 - i >= 0) & (a + window - 1 - i < window)
    labels = (docs.to(torch.int64) + 1)[:, None, :, None]  # (B, 1, T, 1), ids >= 1; padding is 0
    query_docs = _query_chunks(labels, chunk, chunks)[:, 0, :, :, 0]
    key_docs = _key_windows(labels, chunk, chunks, window)[:, 0, :, :, 0]
    return (near & (query_docs[..., :, None] == key_docs[..., None, :]))[:, None]


def composable_attention(q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, scale: float, window: int,
                         docs: Tensor | None) -> Tensor:
    """Post-softmax dynamically composable attention (2026 record, A8), the term added to the
    attention output y. q, k, v (B, T, H, D); w1, w2 (B, T, H) per-token head weights; docs (B, T)
    document ids or None. Each head's softmax(scale·q·k) is renormalised over the query's last
    `window` keys in its document; A = Σ_h rms_h(w1)_h·P_h mixes the heads' probabilities, and head
    h adds w2_h·(A @ v_h).

    Queries go in chunks of `window`, each against the chunk + window - 1 keys it can reach, so
    memory is O(T·window·H) rather than O(T²). Scores, probabilities and A are computed in float32
    (float64 stays float64); A·w2 meets v in v's dtype, as the record's kernel does."""
    if window < 1:
        raise ValueError(f"composable attention needs a window of at least one key, got {window}")
    T, H = q.shape[1], q.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    chunks = -(-T // window)
    mix = F.rms_norm(w1.to(compute), (H,), eps=1e-6)  # over heads, per token
    q_c, mix_c, w2_c = (_query_chunks(x, window, chunks) for x in (q.transpose(1, 2), mix.mT[..., None],
                                                                    w2.to(compute).mT[..., None]))
    k_w, v_w = (_key_windows(x.transpose(1, 2), window, chunks, window) for x in (k, v))
    scores = (q_c.to(compute) @ k_w.to(compute).transpose(-1, -2)) * scale
    allowed = _composable_allowed(docs, T, window, chunks, window, q.device)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (B, H, n, chunk, keys)
    composed = (mix_c * probs).sum(dim=1, keepdim=True)
    out = (w2_c * composed).to(v.dtype) @ v_w
    return out.flatten(2, 3)[:, :, :T].transpose(1, 2)
