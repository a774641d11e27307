"""Attention masks and the two attention backends.

One rule decides which keys a query sees: key position <= query position, query - key < window,
and (with `document_mask`) the same document, where a document starts at each BOS token. Both
backends apply exactly this rule: FlexAttention through block-sparse masks (`BlockMask`), the
SDPA fallback through a dense boolean mask. Masks are built once per forward pass, one for the
long window and one for the short (half) window, and shared by all layers. CPU and MPS always
take the SDPA path (see `use_flex`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from speedrun.config import ModelConfig

BOS_TOKEN = 50256  # GPT-2's <|endoftext|>, which the data puts at the start of every document
NO_WINDOW = 1 << 30  # a window longer than any sequence


def window_tokens(step: int, total_steps: int, cfg: ModelConfig) -> int:
    """The attention window at `step`: grows linearly from window_min to window_max over the run,
    rounded up to whole window_block blocks so FlexAttention's block sparsity changes in steps."""
    if not cfg.sliding_window:
        return NO_WINDOW
    step = min(max(step, 0), total_steps)
    # integer ceil-divisions, so the value never depends on float rounding
    window = cfg.window_min + -(-(cfg.window_max - cfg.window_min) * step // max(total_steps, 1))
    return -(-window // cfg.window_block) * cfg.window_block


def document_ids(idx: Tensor) -> Tensor:
    """(B, T) tokens -> (B, T) ids that increase by one at every BOS."""
    return (idx == BOS_TOKEN).cumsum(-1)


# How much each long_short_pattern letter divides the window by: S layers see half of it.
SHRINK = {"L": 1, "S": 2}


def mask_rule(docs: Tensor | None, window: int | Tensor, shrink: int = 1):
    """The mask_mod (b, h, q, kv) -> keep? shared by both backends: q - kv < window / shrink.

    `window` may be a 0-d tensor on the model's device, so a compiled model need not recompile as
    the window grows. The division is kept as the integer product (q - kv) * shrink < window rather
    than a halved window tensor: a scalar tensor computed inside the graph and captured by a
    mask_mod makes Inductor's CPU FlexAttention kernel fail to lower (torch 2.13)."""

    def keep(b, h, q, kv):
        allowed = (q >= kv) & ((q - kv) * shrink < window)
        if docs is not None:
            allowed = allowed & (docs[b, q] == docs[b, kv])
        return allowed

    return keep


def dense_mask(docs: Tensor | None, window: int | Tensor, shrink: int, batch: int, seq_len: int, device) -> Tensor:
    """(B or 1, 1, T, T) boolean mask for SDPA, True where attention is allowed."""
    pos = torch.arange(seq_len, device=device)
    b = torch.arange(batch if docs is not None else 1, device=device)[:, None, None, None]
    return mask_rule(docs, window, shrink)(b, 0, pos[:, None], pos[None, :])


def _as_ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q, KV) boolean block grid -> BlockMask's (count, indices) form, selected blocks first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), indices[:, None].contiguous()


def flex_masks(docs: Tensor | None, window: int | Tensor, seq_len: int, block: int, device) -> dict[str, BlockMask]:
    """A BlockMask per SHRINK letter, built from block-level bounds rather than by evaluating the
    rule on every (q, kv) pair: a block pair is skipped when no pair in it is allowed, "full" when
    every pair is (no mask_mod call inside), and partial otherwise. Cost is O(B * (T/block)^2)
    elementwise ops, all tensor code, so it compiles and never syncs with the host."""
    n = seq_len // block
    blk = torch.arange(n, device=device)
    q_blk, kv_blk = blk[:, None], blk[None, :]
    some = (q_blk >= kv_blk)[None]
    every = (q_blk > kv_blk)[None]  # a diagonal block always holds some future keys
    if docs is not None:
        # doc ids never decrease, so a block's first and last ids bound every id in it
        lo, hi = docs[:, ::block], docs[:, block - 1::block]
        lo_q, hi_q, lo_kv, hi_kv = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
        some = some & (lo_q <= hi_kv) & (hi_q >= lo_kv)
        every = every & (lo_q == hi_q) & (lo_kv == hi_kv) & (lo_q == lo_kv)
    gap = (q_blk - kv_blk) * block  # distance between the blocks' first positions
    masks = {}
    for letter, shrink in SHRINK.items():
        full = every & ((gap + block - 1) * shrink < window)
        partial = some & ((gap - block + 1) * shrink < window) & ~full
        masks[letter] = BlockMask.from_kv_blocks(*_as_ordered(partial), *_as_ordered(full), BLOCK_SIZE=block,
                                                 mask_mod=mask_rule(docs, window, shrink),
                                                 seq_lengths=(seq_len, seq_len))
    return masks


def use_flex(cfg: ModelConfig, seq_len: int, device: torch.device) -> bool:
    """FlexAttention when configured and the sequence is whole blocks, except on CPU and MPS:
    there it has no backward, and its unfused eager form is ~3x slower than SDPA's."""
    return cfg.attention == "flex" and seq_len % cfg.window_block == 0 and device.type not in ("cpu", "mps")


def build_masks(idx: Tensor, window: int | Tensor, cfg: ModelConfig) -> dict[str, BlockMask | Tensor | None]:
    """Masks for one forward pass, keyed by long_short_pattern letter. Values: a BlockMask
    (FlexAttention), a dense boolean mask (SDPA), or None (SDPA with is_causal, when neither
    documents nor windows restrict attention)."""
    B, T = idx.shape
    docs = document_ids(idx) if cfg.document_mask else None
    if use_flex(cfg, T, idx.device):
        return flex_masks(docs, window, T, cfg.window_block, idx.device)
    if docs is None and not cfg.sliding_window:
        return {"L": None, "S": None}
    return {letter: dense_mask(docs, window, shrink, B, T, idx.device) for letter, shrink in SHRINK.items()}


def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | Tensor | None, scale: float) -> Tensor:
    """Attention over (B, H, T, D) tensors with a mask from `build_masks`."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, scale=scale)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
