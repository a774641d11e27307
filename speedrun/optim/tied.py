"""The 2026 record's tied-then-untied head (record-2026.md §3 E6): the untied head and the token
embedding start as one matrix and stay one for the first stages, then train apart.

Both are (padded_vocab, dim) parameters of the same Adam optimizer. While tied, each training step
folds the embedding's gradient into the head's (`add_embedding_grad`, before the optimizer step),
so the optimizer updates the head alone on the sum, and the embedding is then overwritten with the
head (`copy_head_to_embedding`, after the step). At the split, `untie` gives the embedding the
head's optimizer state, so its first own updates continue from the moments the shared matrix built
up instead of starting Adam afresh.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(head: Tensor, embed: Tensor) -> None:
    if head is embed or head.shape != embed.shape or head.dtype != embed.dtype:
        raise ValueError(f"head {tuple(head.shape)} {head.dtype} and embedding {tuple(embed.shape)} {embed.dtype} "
                         "must be two parameters of one shape and dtype")


@torch.no_grad()
def add_embedding_grad(head: Tensor, embed: Tensor) -> None:
    """While tied, before the optimizer step: head.grad += embed.grad, and embed.grad = None, so the
    optimizer leaves the embedding alone (no update, no weight decay, no state)."""
    _check_pair(head, embed)
    if embed.grad is None:
        return
    if head.grad is None:
        head.grad = embed.grad
    else:
        head.grad.add_(embed.grad)
    embed.grad = None


@torch.no_grad()
def copy_head_to_embedding(head: Tensor, embed: Tensor) -> None:
    """While tied, after the optimizer step: the embedding becomes the updated head again."""
    _check_pair(head, embed)
    embed.copy_(head)


def _holds(optimizer: torch.optim.Optimizer, p: Tensor) -> bool:
    return any(q is p for group in optimizer.param_groups for q in group["params"])


def untie(optimizer: torch.optim.Optimizer, head: Tensor, embed: Tensor) -> None:
    """At the split, after the last tied step: the embedding's optimizer state becomes a copy of the
    head's, whatever keys the optimizer keeps (torch.optim.AdamW: step, exp_avg, exp_avg_sq;
    RecordAdam: steps, updates, exp_avg, exp_avg_sq and a pending grad_sum between updates, which
    while tied summed both gradients and so is the embedding's too). Either may be in any group."""
    _check_pair(head, embed)
    missing = [name for name, p in (("head", head), ("embedding", embed)) if not _holds(optimizer, p)]
    if missing:
        raise ValueError(f"the optimizer does not hold the {' and '.join(missing)}")
    optimizer.state[embed] = {key: value.clone() if isinstance(value, Tensor) else value
                              for key, value in optimizer.state[head].items()}
