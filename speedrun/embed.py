"""The input embeddings: the lookups whose sum starts the residual stream.

Each entry of INPUT_EMBEDDINGS builds, from the model config, a module `forward(idx, past) ->
(B, T, dim)` (or None when the config leaves it out); GPT holds each under its entry's name, which
is also its checkpoint key, and `embed` adds up the ones present in the activations' dtype. A new
input embedding (a hashed n-gram table, say) is one class and one entry here; a gate that mixes
neighbouring tokens' embeddings acts on `embed`'s sum. Every module here is an nn.Embedding, so
its table lands in the optimizer's "embed" group (GPT.param_groups).

The 2026 record's input-side pieces follow: the smear gate (E1), the hashed bigram embedding (E2)
and per-layer value embeddings (E3); see their section below for how they differ from these."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig


def normal_(w: Tensor, mean: float, std: float) -> None:
    """w.normal_(mean, std), except on the meta device, where there is nothing to draw and torch's
    normal_ imports torch._dynamo: 1.3-1.7 s of every command that builds the model there before
    loading its weights (sample, eval, export). Elsewhere the same draws in the same order."""
    if not w.is_meta:
        w.normal_(mean, std)


class Table(nn.Embedding):
    """nn.Embedding, its N(0, 1) init drawn by `normal_` (no draw on the meta device)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        normal_(self.weight, 0.0, 1.0)


class TokenEmbedding(Table):
    """One row per token id. A tied table is also the head, whose rows are padded so its matmul
    tiles evenly, and so is one that starts as the head's copy and is tied to it for some stages
    (head_init_std); an untied one needs only the vocabulary's rows (as the 2025 record)."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__(padded_vocab if cfg.tied_head or cfg.head_init_std else cfg.vocab_size, cfg.model_dim)

    def forward(self, idx: Tensor, past: int) -> Tensor:
        return super().forward(idx)


class PositionEmbedding(Table):
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


# The 2026 record's input side (record-2026.md §3 E1-E3). These are not INPUT_EMBEDDINGS: the smear
# gate rewrites the raw token embedding before the norm, the bigram term is added to the residual
# stream by per-layer gates after it, and each value table feeds one layer's attention. Parameters
# carry their optimizer role in `p.role` (config.ROLES), read by GPT.param_groups. `to_empty()` on a
# meta-built module replaces its Parameter objects and so drops those attributes: `reset_parameters`
# tags them again along with the init, which is why both run in __init__ and after `to_empty()`.

SMEAR_GATE_DIMS = 12  # the gate reads this many leading dims of the current token's embedding
BIGRAM_CURRENT_MULTIPLIER = 36313
BIGRAM_PREVIOUS_MULTIPLIER = 27191
BIGRAM_SIGN_SEED = 20260183  # any fixed value: the signs must only be the same everywhere, always


def _previous_and_current(idx: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """The (previous, current) pairs of every position of `idx` (B, T) that has a previous token:
    positions 1.. alone, or all of them when `prev` (B, 1) holds the token before idx[:, 0]."""
    if prev is None:
        return idx[:, :-1], idx[:, 1:]
    return torch.cat([prev.to(idx.dtype), idx[:, :-1]], dim=1), idx


def _prepend_first(ids: Tensor, prev: Tensor | None, first: int) -> Tensor:
    """`ids` of positions 1.. with position 0's id `first` in front, unless `prev` covered position 0."""
    if prev is not None:
        return ids
    return torch.cat([ids.new_full((ids.size(0), 1), first), ids], dim=1)


def bigram_ids(idx: Tensor, prev: Tensor | None, rows: int) -> Tensor:
    """Bigram-table row of each position of `idx` (B, T): ((36313·x_t) XOR (27191·x_(t-1))) mod
    (rows - 1), with row `rows - 1` kept for a first token that has no previous one. Computed in
    int64; for token ids below 2^31 / 36313 (59,138, so all of GPT-2's) every product fits in 31
    bits, so this equals the record's int32 arithmetic."""
    if rows < 2:
        raise ValueError(f"a bigram table needs at least 2 rows, got {rows}")
    previous, current = _previous_and_current(idx.long(), prev)
    hashed = torch.bitwise_xor(BIGRAM_CURRENT_MULTIPLIER * current, BIGRAM_PREVIOUS_MULTIPLIER * previous) % (rows - 1)
    return _prepend_first(hashed, prev, rows - 1)


def bigram_sign_ids(idx: Tensor, prev: Tensor | None, sign_rows: int) -> Tensor:
    """Sign-table row of each position of `idx` (B, T): (x_(t-1) XOR x_t) mod sign_rows, 0 for a
    first token that has no previous one. Two bigrams sharing a table row rarely share a sign row
    too, so their contributions decorrelate instead of adding up (the record's sign trick)."""
    if sign_rows < 1:
        raise ValueError(f"a sign table needs at least 1 row, got {sign_rows}")
    previous, current = _previous_and_current(idx.long(), prev)
    return _prepend_first(torch.bitwise_xor(previous, current) % sign_rows, prev, 0)


def bigram_signs(rows: int, dim: int) -> Tensor:
    """The (rows, dim) ±1 sign table, float32 on the CPU, drawn from its own fixed-seed generator:
    the same on every rank and in every run whatever the global RNG's state. (It depends on
    torch's CPU generator staying as it is; tests/test_embed_2026.py pins a few values.)"""
    generator = torch.Generator(device="cpu").manual_seed(BIGRAM_SIGN_SEED)
    bits = torch.randint(0, 2, (rows, dim), generator=generator)
    return (2 * bits - 1).float()


class SmearGate(nn.Module):
    """E1: e_t += λ·σ(w·e_t[:12])·e_(t-1) on the raw token embedding, so each position also sees
    a gated share of the one before it. w (1, 12) and λ start at zero: the gate starts closed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, SMEAR_GATE_DIMS))
        self.strength = nn.Parameter(torch.empty(()))  # λ
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.strength.zero_()
        self.weight.role = "smear"
        self.strength.role = "scalar"

    def forward(self, e: Tensor, prev: Tensor | None = None) -> Tensor:
        """e (B, T, D) -> (B, T, D); `prev` (B, 1, D), the raw embedding of the token before
        e[:, 0] (a KV cache continuing a sequence), smears position 0 too."""
        previous, current = _previous_and_current(e, prev)
        opening = torch.sigmoid(F.linear(current[..., :SMEAR_GATE_DIMS], self.weight.type_as(e)))
        gate = self.strength.type_as(e) * opening
        smeared = current + gate * previous
        return smeared if prev is not None else torch.cat([e[:, :1], smeared], dim=1)


class BigramEmbedding(nn.Module):
    """E2: a hashed table of token pairs, bg_t = table[h_t] ⊙ signs[s_t] (bigram_ids,
    bigram_sign_ids), or table[h_t] alone when cfg.bigram_sign_rows is 0. The table starts at zero.
    `signs` is a non-persistent buffer: a function of BIGRAM_SIGN_SEED and its shape, so it stays
    out of checkpoints and `reset_parameters` rebuilds it (after `to_empty()` too)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = Table(cfg.bigram_vocab, cfg.model_dim)
        self.sign_rows = cfg.bigram_sign_rows
        if self.sign_rows:
            self.register_buffer("signs", torch.empty(self.sign_rows, cfg.model_dim), persistent=False)
        else:
            self.signs = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.table.weight.zero_()
        self.table.weight.role = "value_embed"
        self.fill_signs()

    @torch.no_grad()
    def fill_signs(self) -> None:
        """(Re)compute the sign table, e.g. after `to_empty()` on a meta-built model."""
        if self.signs is not None and not self.signs.is_meta:
            self.signs.copy_(bigram_signs(*self.signs.shape))

    def forward(self, idx: Tensor, prev: Tensor | None = None) -> Tensor:
        """idx (B, T) -> (B, T, D) in the table's dtype; `prev` (B, 1), the token before idx[:, 0]."""
        rows = self.table(bigram_ids(idx, prev, self.table.num_embeddings))
        if self.signs is None:
            return rows
        return rows * self.signs[bigram_sign_ids(idx, prev, self.sign_rows)].to(rows.dtype)


class LayerValueEmbeddings(nn.Module):
    """E3: one (vocab, D) table per layer of cfg.value_embed_layers, each feeding that layer's
    attention values; init N(0, value_embed_std²)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.std = cfg.value_embed_std
        self.tables = nn.ModuleDict({str(layer): Table(cfg.vocab_size, cfg.model_dim)
                                     for layer in cfg.value_embed_layers})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for table in self.tables.values():
            normal_(table.weight, 0.0, self.std)
            table.weight.role = "value_embed"

    def forward(self, idx: Tensor) -> dict[int, Tensor]:
        """idx (B, T) -> {layer: (B, T, D)} for every layer with a table."""
        return {int(layer): table(idx) for layer, table in self.tables.items()}
