"""The loss tail: final hidden states -> head matmul (FP8 in training where prepared) -> float32
logits -> softcap -> the vocabulary's columns -> cross-entropy.

`LMHead` owns the untied head weight (a tied head borrows the token embedding's) and every choice
after the last block, so that a loss with several targets per position or an auxiliary term
changes this file only. Besides the next-token loss it has the 2026 record's two extra targets per
position (record-2026.md §3 L1, L2): the tokens k positions further on (multi-token prediction)
and the prefix token of the next token.

Normalisation, as the record sums its per-position losses: position t's loss is
  sum_k w_k·CE(z_t, targets[t + k]) over the k whose target is inside the sequence
  + w_p·CE(z_t, prefix_targets[t]) if prefix_targets[t] >= 0,
and the loss is the sum of these over all B·T positions divided by B·T. A term missing at some
positions is dropped there, not renormalised over the positions that have it; with only the
next-token term this is the usual mean cross-entropy."""

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
            # cap * sigmoid(z / T) = cap/2 * (tanh(z / 2T) + 1): a tanh softcap shifted to (0, cap);
            # softcap_shift (the 2026 record: 5) moves the logit that maps to cap/2 from 0 to -shift
            if self.cfg.softcap_shift:
                logits = logits + self.cfg.softcap_shift
            logits = cap * torch.sigmoid(logits / self.cfg.softcap_temperature)
        # drop the padding rows' columns so they take no probability mass
        return logits[..., :self.cfg.vocab_size]

    def forward(self, x: Tensor, tied_weight: Tensor | None, targets: Tensor | None = None,
                future_weights: Sequence[float] | Tensor = (1.0,), prefix_targets: Tensor | None = None,
                prefix_weight: float | Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab_size), or with targets (B, T) the loss (the module docstring's
        normalisation). `future_weights[k]` weighs the target k positions further on (k = 0: the
        next token); a 1-D tensor of weights lets them change every step without a recompile.
        `prefix_targets` (B, T) is the prefix token of each target (-1: none), weighed by
        `prefix_weight` (a float or a one-element tensor)."""
        logits = self.logits(x, tied_weight if self.weight is None else self.weight)
        if targets is None:
            return logits
        if (prefix_targets is None) != (prefix_weight is None):
            raise ValueError("prefix_targets and prefix_weight must be given together")
        if not isinstance(future_weights, Tensor):
            # Python weights are fixed for the graph: skip the zero terms, and keep the plain
            # next-token loss on F.cross_entropy exactly as it was before these options.
            future_weights = {k: w for k, w in enumerate(future_weights) if w}
            if not future_weights and prefix_targets is None:
                raise ValueError("future_weights has no nonzero weight and there is no prefix term: no loss")
            if list(future_weights) == [0] and prefix_targets is None:
                return future_weights[0] * F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        # CE(z, y) = logsumexp(z) - z[y]: one normaliser per position serves all its targets
        lse = logits.logsumexp(-1)
        total = _future_loss_sum(logits, lse, targets, future_weights)
        if prefix_targets is not None:
            total = total + prefix_weight * _prefix_loss_sum(logits, lse, prefix_targets)
        return (total / targets.numel()).reshape(())


def _cross_entropies(logits: Tensor, lse: Tensor, targets: Tensor) -> Tensor:
    """Per-position CE of `logits` (..., vocab) with log-normalisers `lse` (...) against `targets` (...)."""
    return lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _future_loss_sum(logits: Tensor, lse: Tensor, targets: Tensor, weights: dict[int, float] | Tensor) -> Tensor:
    """sum_k weights[k] · sum over t < T - k of CE(logits[:, t], targets[:, t + k]); `weights` maps
    k to its weight, or is a 1-D tensor indexed by k."""
    T = targets.size(1)
    ks = weights.keys() if isinstance(weights, dict) else range(weights.numel())
    total = logits.new_zeros(())
    for k in (k for k in ks if k < T):
        total = total + weights[k] * _cross_entropies(logits[:, :T - k], lse[:, :T - k], targets[:, k:]).sum()
    return total


def _prefix_loss_sum(logits: Tensor, lse: Tensor, prefix_targets: Tensor) -> Tensor:
    """sum over the positions with a prefix target (>= 0) of CE(logits[:, t], prefix_targets[:, t])."""
    losses = _cross_entropies(logits, lse, prefix_targets.clamp(min=0))
    return torch.where(prefix_targets >= 0, losses, 0.0).sum()
