"""Generation: the KV cache and the decoding loop. `GPT.forward` takes a cache as `cache=` and uses
only its `length`, `masks(idx)` and `layers[i]` (each layer's `extend(k, v)`), so the model does not
depend on this module."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from speedrun.attention import NO_WINDOW, Windows, document_ids, farthest_key, letter_windows, mask_rule, window_rule_block
from speedrun.config import ModelConfig
from speedrun.model import GPT


class LayerCache:
    """One layer's keys and values, (B, H, S, D), trimmed to the last `keep` positions: a query
    never sees further back than its window, so older keys can only ever be masked out."""

    def __init__(self, keep: int):
        self.keep = keep
        self.k = self.v = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions; return every key and value the new queries may need."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k[:, :, -self.keep:], v[:, :, -self.keep:]
        return k, v


class KVCache:
    """State for decoding a few tokens at a time: pass one cache to successive `GPT.forward` calls,
    each with only the tokens that follow the last call's. Positions, documents and the window then
    count from the first call's first token, so the logits equal those of one uncached forward over
    the whole sequence. The window is fixed here because keys it has let go of cannot come back."""

    def __init__(self, cfg: ModelConfig, windows: Windows = Windows(NO_WINDOW)):
        self.cfg, self.block = cfg, window_rule_block(cfg)
        self.windows = letter_windows(*windows)
        self.keep = {letter: farthest_key(size, shrink, self.block) for letter, (size, shrink) in self.windows.items()}
        self.layers = [LayerCache(self.keep[cfg.window_letter(i)]) for i in range(cfg.n_layer)]
        self.tokens: Tensor | None = None  # every token so far: document ids count BOS from the start

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.size(1)

    def masks(self, idx: Tensor) -> dict[str, Tensor]:
        """Record the new tokens; return per letter the (B or 1, 1, T, kept + T) mask of the new
        queries over the keys that letter's layers hold, by `mask_rule` at absolute positions."""
        past = self.length
        self.tokens = idx if self.tokens is None else torch.cat([self.tokens, idx], dim=1)
        docs = document_ids(self.tokens) if self.cfg.document_mask else None
        device = idx.device
        queries = torch.arange(past, self.tokens.size(1), device=device)[:, None]
        b = torch.arange(idx.size(0) if docs is not None else 1, device=device)[:, None, None, None]
        masks = {}
        for letter, (size, shrink) in self.windows.items():
            held = min(past, self.keep[letter])
            keys = torch.arange(past - held, self.tokens.size(1), device=device)[None, :]
            masks[letter] = mask_rule(docs, size, shrink, self.block)(b, 0, queries, keys)
        return masks


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """(B, vocab) logits -> (B, 1) tokens: the most likely at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top_k most likely."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, prompt: Tensor, max_tokens: int, windows: Windows, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` tokens following `prompt` (B=1, T) one at a time: the prompt is fed
    once, then each new token alone, over a KV cache; a model that cannot use one
    (GPT.caches_keys) is run over the whole sequence for every token instead."""
    if not model.caches_keys:
        seq = prompt
        for _ in range(max_tokens):
            logits = model(seq, window_tokens=windows.long, short_window=windows.short)[:, -1]
            seq = torch.cat([seq, next_token(logits, temperature, top_k, generator)], dim=1)
            yield int(seq[0, -1])
        return
    cache = KVCache(model.cfg, windows)
    new = prompt
    for _ in range(max_tokens):
        new = next_token(model(new, cache=cache)[:, -1], temperature, top_k, generator)
        yield int(new)
