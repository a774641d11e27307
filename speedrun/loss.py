"""The loss tail: final hidden states -> head matmul (FP8 in training where prepared) -> float32
logits -> softcap -> the vocabulary's columns -> cross-entropy.

`LMHead` owns the untied head weight (a tied head borrows the token embedding's) and every choice
after the last block, so that a loss with several targets per position or an auxiliary term
changes this file only: `future_weights` already weighs the cross-entropy against the next token
(k = 0) and, for multi-token prediction, the tokens k positions further."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.fp8 import fp8_linear


class LMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.weight = None if cfg.tied_head else nn.Parameter(torch.empty(padded_vocab, cfg.model_dim))
        # [x, w, grad] scales while training with the FP8 head; None: the head runs in the activations'
        # dtype. Set by speedrun.prepare, which knows the device.
        self.fp8_scales: list[float] | None = None

    def logits(self, x: Tensor, weight: Tensor) -> Tensor:
        """(..., dim) -> (..., vocab_size) float32 logits, softcapped, padding columns dropped."""
        if self.fp8_scales is not None and self.training:
            logits = fp8_linear(x, weight, self.fp8_scales)
        else:
            logits = F.linear(x, weight.type_as(x))
        logits = logits.float()
        cap = self.cfg.logit_softcap
        if cap > 0:
            # cap * sigmoid(z / T) = cap/2 * (tanh(z / 2T) + 1): a tanh softcap shifted to (0, cap)
            logits = cap * torch.sigmoid(logits / self.cfg.softcap_temperature)
        # drop the padding rows' columns so they take no probability mass
        return logits[..., :self.cfg.vocab_size]

    def forward(self, x: Tensor, tied_weight: Tensor | None, targets: Tensor | None = None,
                future_weights: Sequence[float] = (1.0,)) -> Tensor:
        """Logits (B, T, vocab_size), or with targets (B, T) the loss
        sum_k future_weights[k] * mean cross-entropy of position t against targets[t + k], over the
        positions that have such a target (k = 0: the usual next-token loss)."""
        logits = self.logits(x, tied_weight if self.weight is None else self.weight)
        if targets is None:
            return logits
        T, vocab = targets.size(1), logits.size(-1)
        terms = [weight * F.cross_entropy(logits[:, :T - k].reshape(-1, vocab), targets[:, k:].reshape(-1))
                 for k, weight in enumerate(future_weights) if weight and k < T]
        return sum(terms[1:], terms[0])
