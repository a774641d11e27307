"""The input embeddings: the lookups whose sum starts the residual stream.

Each entry of INPUT_EMBEDDINGS builds, from the model config, a module `forward(idx, past) ->
(B, T, dim)` (or None when the config leaves it out); GPT holds each under its entry's name, which
is also its checkpoint key, and `embed` adds up the ones present in the activations' dtype. A new
input embedding (a hashed n-gram table, say) is one class and one entry here; a gate that mixes
neighbouring tokens' embeddings acts on `embed`'s sum. Every module here is an nn.Embedding, so
its table lands in the optimizer's "embed" group (GPT.param_groups)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from speedrun.config import ModelConfig


class TokenEmbedding(nn.Embedding):
    """One row per token id. A tied table is also the head, whose rows are padded so its matmul
    tiles evenly; an untied one needs only the vocabulary's rows (as the record)."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__(padded_vocab if cfg.tied_head else cfg.vocab_size, cfg.model_dim)

    def forward(self, idx: Tensor, past: int) -> Tensor:
        return super().forward(idx)


class PositionEmbedding(nn.Embedding):
    """Learned absolute positions (GPT-2), counted from the first token a KV cache has seen."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.max_seq_len, cfg.model_dim)

    def forward(self, idx: Tensor, past: int) -> Tensor:
        return super().forward(torch.arange(past, past + idx.size(1), device=idx.device))


INPUT_EMBEDDINGS: dict[str, Callable[[ModelConfig, int], nn.Module | None]] = {
    "wte": TokenEmbedding,
    "wpe": lambda cfg, padded_vocab: PositionEmbedding(cfg) if cfg.positional == "learned" else None,
}


def build_input_embeddings(model: nn.Module, cfg: ModelConfig, padded_vocab: int) -> None:
    for name, build in INPUT_EMBEDDINGS.items():
        setattr(model, name, build(cfg, padded_vocab))


def embed(model: nn.Module, idx: Tensor, past: int, dtype: torch.dtype) -> Tensor:
    """The sum of the model's input embeddings of `idx` (B, T), whose first token is at position `past`."""
    x = None
    for name in INPUT_EMBEDDINGS:
        module = getattr(model, name)
        if module is not None:
            e = module(idx, past).to(dtype)
            x = e if x is None else x + e
    return x
