"""Rotary position embeddings: the frequencies, their YaRN stretch, the cos/sin tables and the
rotation itself, for both pairings of a head's dimensions, and the paired-head layers' rotation
and row view.

A frequency vector holds one angular frequency per rotated pair, D/2 entries for head_dim D; a
zero entry leaves its pair unrotated (the half-truncated RoPE the records use keeps the second
half of the pairs position-free). Pairings (ModelConfig.rotary_pairs):
- "halves": pair i is dims (i, i + D/2), the 2025 record's layout;
- "adjacent": pair i is dims (2i, 2i + 1), the 2026 record's; with half truncation only dims
  0 .. D/2 - 1 rotate.
Pair (a, b) at angle θ becomes (a·cos θ + b·sin θ, b·cos θ - a·sin θ): a + ib times e^(-iθ).

YaRN (2026 record, A2): each time the long attention window grows, low frequencies are
stretched by old/new, high ones (many rotations inside the old window) kept, and the attention
scale raised. The state is a pure function of the long windows seen so far (`yarn_state`), so a
run resumed at any step recomputes it from the window schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from speedrun.config import ModelConfig


def base_frequencies(cfg: ModelConfig, device) -> Tensor:
    """(head_dim/2,) angular frequency per pair, before any YaRN stretch. Half truncated: the first
    head_dim/4 pairs (1/rotary_base)^linspace(0, 1, head_dim/4), the rest 0; else
    (1/rotary_base)^(i / (head_dim/2))."""
    half = cfg.head_dim // 2
    if cfg.rotary_half_truncate:
        freq = (1.0 / cfg.rotary_base) ** torch.linspace(0, 1, half // 2, device=device)
        return torch.cat([freq, freq.new_zeros(half - half // 2)])
    return (1.0 / cfg.rotary_base) ** (torch.arange(half, device=device) / half)


def rotary_tables_from(freq: Tensor, positions: Tensor | int) -> tuple[Tensor, Tensor]:
    """cos and sin of positions × freq, float32, shaped positions.shape + (len(freq),); an int n
    stands for positions 0 .. n-1, giving the usual (n, D/2) tables."""
    if isinstance(positions, int):
        positions = torch.arange(positions, device=freq.device)
    theta = positions.to(torch.float32)[..., None] * freq.to(torch.float32)
    return theta.cos(), theta.sin()


def rotary_tables(seq_len: int, cfg: ModelConfig, device) -> tuple[Tensor, Tensor]:
    """cos and sin, (T, head_dim/2), at positions 0 .. T-1 with the unstretched frequencies,
    recomputed per call: they are cheap, and holding no buffers keeps the model trivially
    buildable on the meta device."""
    return rotary_tables_from(base_frequencies(cfg, device), seq_len)


def _per_token_and_head(table: Tensor) -> Tensor:
    """(T, D/2) or (T, H, D/2) table -> broadcastable over (B, T, H, D/2)."""
    return table[None, :, None, :] if table.dim() == 2 else table[None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, pairs: str = "halves") -> Tensor:
    """Rotate (B, T, H, D) by position, in float32, returned in x's dtype. cos and sin are (T, D/2)
    tables shared by all heads or (T, H, D/2) per-head ones; `pairs` is "halves" or "adjacent"."""
    cos, sin = _per_token_and_head(cos), _per_token_and_head(sin)
    if pairs == "halves":
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1).type_as(x)
    if pairs == "adjacent":
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos + b * sin, b * cos - a * sin], dim=-1).flatten(-2).type_as(x)
    raise ValueError(f"unknown rotary pairing '{pairs}' (halves | adjacent)")


def paired_tables(freq: Tensor, past: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(T, 2, D/2) cos and sin for `rotate_paired` on tokens past .. past + T - 1: entry (t, s) is
    position 2(past + t) + s, as if each token were two consecutive ones."""
    token = torch.arange(past, past + seq_len, device=freq.device)[:, None]
    return rotary_tables_from(freq, 2 * token + torch.arange(2, device=freq.device))


def rotate_paired(x: Tensor, tables: tuple[Tensor, Tensor], pairs: str) -> Tensor:
    """A paired-head layer's rotation (2026 record, A3) of (B, T, H, D) q or k after QK-norm: head
    h of token t at position 2t + (h mod 2), the record's grouping of heads 2j and 2j + 1."""
    parity = torch.arange(x.size(2), device=x.device) % 2
    cos, sin = (table[:, parity] for table in tables)
    return apply_rotary(x, cos, sin, pairs)


def to_pair_rows(x: Tensor) -> Tensor:
    """(B, T, H, D) -> (B, 2T, H/2, D), a paired-head layer's q, k or v as rows: row 2t holds heads
    0 .. H/2 - 1 of token t, row 2t + 1 heads H/2 .. H - 1, so head slot j meets heads j and
    j + H/2 of every token (the record's memory view; attention.build_masks(paired=True) gives
    the rows' masks)."""
    B, T, H, D = x.shape
    if H % 2:
        raise ValueError(f"paired heads need an even number of heads, got {H}")
    return x.reshape(B, 2 * T, H // 2, D)


def from_pair_rows(y: Tensor) -> Tensor:
    """The inverse of to_pair_rows: (B, 2T, H/2, D) -> (B, T, H, D)."""
    B, rows, half, D = y.shape
    return y.reshape(B, rows // 2, 2 * half, D)


def yarn_update(freq: Tensor, old_window: int, new_window: int, alpha: float = 1, beta: float = 32) -> Tensor:
    """Frequencies after the long window grows old -> new: with r = old·ω/2π the rotations a pair
    makes inside the old window and γ = clamp((r - alpha)/(beta - alpha), 0, 1), ω becomes
    ω·(old/new + γ·(1 - old/new)): pairs that turn fewer than alpha times are slowed by old/new
    (interpolated), those turning more than beta times are kept, and a ramp in between."""
    ratio = old_window / new_window
    rotations = old_window * freq / (2 * math.pi)
    ramp = ((rotations - alpha) / (beta - alpha)).clamp(0, 1)
    return freq * (ratio + ramp * (1 - ratio))


def yarn_scale(old_window: int, new_window: int) -> float:
    """The factor on the attention scale when the long window grows old -> new."""
    return 1 + 0.2 * math.log(new_window / old_window)


def yarn_state(base_freq: Tensor, base_scale: float, long_windows: list[int]) -> tuple[Tensor, float]:
    """Frequencies and attention scale after the long windows `long_windows` (in order, repeats
    allowed): each change old -> new between consecutive entries applies yarn_update and
    yarn_scale once; a constant window leaves (base_freq, base_scale) as they are."""
    freq, scale = base_freq, base_scale
    for old, new in zip(long_windows, long_windows[1:]):
        if new != old:
            freq, scale = yarn_update(freq, old, new), scale * yarn_scale(old, new)
    return freq, scale
