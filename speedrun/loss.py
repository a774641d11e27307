"""The loss tail: final hidden states -> head matmul (FP8 in training where prepared) -> float32
logits -> softcap -> the vocabulary's columns -> cross-entropy.

`LMHead` owns the untied head weight (a tied head borrows the token embedding's) and every choice
after the last block, so that a loss with several targets per position or an auxiliary term
changes this file only. Besides the next-token loss it has the 2026 record's two extra targets per
position (record-2026.md §3 L1, L2): the tokens k positions further on (multi-token prediction)
and the prefix token of the next token.

Trained on CPU with the loss tail compiled (`chunk_rows`, set by speedrun.prepare), the plain
next-token loss runs by row chunks: one matmul gives the bf16 logits, then a compiled kernel takes
`chunk_rows` rows at a time, small enough to stay in cache, through softcap, log-softmax and the
loss's gradient with respect to the logits, so that backward is only the two matmuls of the head.
Compiled whole, the tail writes the float32 softcapped logits out and reads them back, and its
backward reads the logits again: on 2 cores the chunks take about 0.8x its time (docs/benchmarks.md).

Normalisation, as the record sums its per-position losses: position t's loss is
  sum_k w_k·CE(z_t, targets[t + k]) over the k whose target is inside the sequence
  + w_p·CE(z_t, prefix_targets[t]) if prefix_targets[t] >= 0,
and the loss is the sum of these over all B·T positions divided by B·T. A term missing at some
positions is dropped there, not renormalised over the positions that have it; with only the
next-token term this is the usual mean cross-entropy."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.fp8 import fp8_linear

# rows per chunk of the CPU loss tail (module docstring): a chunk's float32 softmax over 50,257
# columns, 6.4 MB, stays in cache; on 2 cores 16, 32 and 64 rows were within noise of each other
LOSS_CHUNK_ROWS = 32
BOUNDED_CAP = 60.0  # exp(60) · 50,304 columns < 1e31, far below float32's 3.4e38


class LMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.weight = None if cfg.tied_head else nn.Parameter(torch.empty(padded_vocab, cfg.model_dim))
        # [x, w, grad] scales while training with the FP8 head; None: the head runs in the activations'
        # dtype. Set by speedrun.prepare, which knows the device.
        self.fp8_scales: list[float] | None = None
        # > 0: a plain next-token loss in training runs by chunks of this many rows (module docstring);
        # set by speedrun.prepare
        self.chunk_rows = 0

    def logits(self, x: Tensor, weight: Tensor) -> Tensor:
        """(..., dim) -> (..., vocab_size) float32 logits, softcapped, padding columns dropped."""
        if self.fp8_scales is not None and self.training:
            logits = fp8_linear(x, weight, self.fp8_scales)
        else:
            logits = F.linear(x, weight.type_as(x))
        logits = logits.float()
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = _softcap(logits, cap, self.cfg.softcap_temperature, self.cfg.softcap_shift)[0]
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
        weight = tied_weight if self.weight is None else self.weight
        if targets is not None and self.chunk_rows and self.training and self.fp8_scales is None \
                and prefix_targets is None and _next_token_only(future_weights):
            return future_weights[0] * _ChunkedCrossEntropy.apply(x, weight, targets, self)
        return self.tail(x, weight, targets, future_weights, prefix_targets, prefix_weight)

    def compile_tail(self, chunk_rows: int = 0) -> None:
        """Compile the loss tail (torch.compile, static shapes). With `chunk_rows`, a plain next-token
        loss in training runs by chunks of that many rows instead (the module docstring)."""
        self.chunk_rows = chunk_rows
        self.tail = torch.compile(self.tail, dynamic=False)

    def tail(self, x: Tensor, weight: Tensor, targets: Tensor | None, future_weights: Sequence[float] | Tensor,
             prefix_targets: Tensor | None, prefix_weight: float | Tensor | None) -> Tensor:
        """forward's general path (its arguments resolved): the logits, and with targets the loss
        through autograd; compile_tail compiles this method."""
        logits = self.logits(x, weight)
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


def _next_token_only(future_weights: Sequence[float] | Tensor) -> bool:
    return not isinstance(future_weights, Tensor) and bool(future_weights[0]) and not any(future_weights[1:])


def _softcap(z: Tensor, cap: float, temperature: float, shift: float) -> tuple[Tensor, Tensor]:
    """(cap·σ((z + shift) / temperature), the σ itself, which the softcap's derivative needs).
    cap·σ(z / T) = cap/2·(tanh(z / 2T) + 1): a tanh softcap shifted to (0, cap); softcap_shift (the
    2026 record: 5) moves the logit that maps to cap/2 from 0 to -shift."""
    squashed = torch.sigmoid((z + shift if shift else z) / temperature)
    return cap * squashed, squashed


def _softcapped_loss_and_grad_(logits: Tensor, targets: Tensor, target_logits: Tensor, cap: float,
                               temperature: float, shift: float, scale: Tensor) -> Tensor:
    """Rows of head outputs (rows, vocab), their targets and the targets' head outputs (rows) -> the
    sum of the rows' cross-entropies after LMHead's softcap; `logits` is overwritten with
    scale · d(that sum)/d(logits). `scale` is a 0-d float32 tensor, so that another batch size does
    not compile another graph. The target logits come gathered, not read here from `logits`: inductor
    in torch 2.9.1 and 2.11.0 (not 2.13.0) ordered that gather after the write to `logits`, so without
    a softcap the loss was computed from the gradient (the gradient itself right)."""
    z, z_target = logits.float(), target_logits.float()
    if cap > 0:
        z, squashed = _softcap(z, cap, temperature, shift)
        z_target = _softcap(z_target, cap, temperature, shift)[0]
    # softcapped logits lie in (0, cap): below BOUNDED_CAP their exponentials cannot overflow a float32
    # sum, and the pass for the row's max that logsumexp makes is saved
    lse = z.exp().sum(-1, keepdim=True).log() if 0 < cap <= BOUNDED_CAP else z.logsumexp(-1, keepdim=True)
    losses = lse.squeeze(-1) - z_target
    onehot = torch.arange(z.size(-1), device=z.device) == targets.unsqueeze(-1)
    grad = (z - lse).exp() - onehot.float()
    if cap > 0:
        grad = grad * (squashed * (1 - squashed)) * (cap / temperature)
    logits.copy_(grad * scale)
    return losses.sum()


@functools.cache
def _compiled_loss_and_grad_():
    # compiled on first use, not at import: importing torch._dynamo fixes inductor's cache directory,
    # which the CLI sets first (speedrun.prepare.use_persistent_compile_cache)
    return torch.compile(_softcapped_loss_and_grad_, dynamic=False)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x Wᵀ (softcapped) against targets, its gradient computed in forward by
    row chunks; W's padding rows get a zero gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, head: LMHead) -> Tensor:
        cfg, rows = head.cfg, x.reshape(-1, x.size(-1))
        w = weight[:cfg.vocab_size].to(x.dtype)
        grad_logits = rows @ w.t()  # the logits, each chunk replaced by its gradient as it is done
        flat_targets, total = targets.reshape(-1), grad_logits.new_zeros((), dtype=torch.float32)
        scale = torch.tensor(1 / rows.size(0), dtype=torch.float32, device=rows.device)
        target_logits = grad_logits.gather(-1, flat_targets.unsqueeze(-1)).squeeze(-1)
        loss_and_grad_ = _compiled_loss_and_grad_()
        for start in range(0, rows.size(0), head.chunk_rows):
            chunk = slice(start, start + head.chunk_rows)
            total += loss_and_grad_(grad_logits[chunk], flat_targets[chunk], target_logits[chunk], cfg.logit_softcap,
                                    cfg.softcap_temperature, cfg.softcap_shift, scale)
        ctx.save_for_backward(rows, w, grad_logits)
        ctx.x_shape, ctx.weight_shape, ctx.weight_dtype = x.shape, weight.shape, weight.dtype
        return total / rows.size(0)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        rows, w, grad_logits = ctx.saved_tensors
        grad_x = (grad_logits @ w).mul_(grad_loss.to(w.dtype)).view(ctx.x_shape)
        grad_w = grad_loss.new_empty(ctx.weight_shape, dtype=ctx.weight_dtype)
        # xᵀG and a transposing copy: on 2 cores 52 against 60 ms for Gᵀx, whose strided read of G
        # the matmul takes badly (docs/benchmarks.md)
        grad_w[:w.size(0)].copy_((rows.t() @ grad_logits).t()).mul_(grad_loss)
        grad_w[w.size(0):] = 0
        return grad_x, grad_w, None, None
