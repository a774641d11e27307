"""Adam(W) for embeddings, the head, scalars, and every matrix in the nanoGPT baseline."""

from __future__ import annotations

import torch

from speedrun.config import OptimConfig


def build(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `groups` (each with its own lr and weight_decay; with weight_decay 0, as the
    speedrun sets, it is exactly Adam). `fused` picks the single-kernel CUDA implementation."""
    return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused)
