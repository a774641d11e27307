"""What Muon and NorMuon share: whole matrices spread over the ranks, each updated by one owner.

If torch.distributed is initialised with W > 1 ranks when the optimizer is built, each group's
parameters are bucketed in order by `bucket_key` (parameters of a bucket are interchangeable for
the exchange), and bucket entry i belongs to rank i % W. The buckets are walked in chunks of W: each
rank computes what its owned parameter contributes (`local`; a rank without one in the last,
short chunk sends `placeholder`), an async all-gather shares the W contributions while the next
chunk is computed, and every rank then applies them (`receive`). Gradients must already be
averaged across ranks (speedrun.distributed.GradientAverager), and a parameter's grad must be None
on all ranks or on none; the result equals a single process's.

State: a rank holds state only for the parameters it owns (`owns(p)`), so `state_dict()` is
local, keyed by parameter index as usual, and holds that rank's share; a complete checkpoint is the
union of all ranks' state dicts. `load_state_dict()` accepts any such union (from any world size)
and keeps only the entries this rank owns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Newer torch renamed all_gather_into_tensor and deprecated the old name; torch 2.9 has only the old
# one, and a build without distributed support has neither (it never needs them: world size is 1).
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class ShardedOptimizer(torch.optim.Optimizer):
    """Subclasses say how parameters bucket, what an owner contributes and how a chunk's
    contributions are applied (see the module docstring)."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"{type(self).__name__} needs parameters with at least 2 dimensions, "
                                     f"got shape {tuple(p.shape)}")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1

    def bucket_key(self, p: Tensor) -> tuple:
        raise NotImplementedError

    def local(self, p: Tensor, group: dict) -> Tensor:
        """What this rank, p's owner, contributes for p (p has a grad)."""
        raise NotImplementedError

    def placeholder(self, p: Tensor) -> Tensor:
        """What a rank without a parameter in a chunk sends in place of `local` for a p like this."""
        raise NotImplementedError

    def receive(self, chunk: list[Tensor], contributions, group: dict) -> None:
        """Apply the chunk's contributions (contributions[r] from the owner of chunk[r])."""
        raise NotImplementedError

    def _buckets(self):
        """Yield (group, bucket): a group's parameters of one bucket_key, in order."""
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                buckets.setdefault(self.bucket_key(p), []).append(p)
            for bucket in buckets.values():
                yield group, bucket

    def _chunks(self):
        """Yield (group, chunk): up to world_size parameters of one bucket, chunk[r] owned by rank r."""
        for group, bucket in self._buckets():
            for i in range(0, len(bucket), self.world_size):
                yield group, bucket[i:i + self.world_size]

    def owns(self, p: Tensor) -> bool:
        """Whether this rank keeps p's state and computes its update."""
        return any(self.rank < len(chunk) and chunk[self.rank] is p for _, chunk in self._chunks())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p in [p for p in self.state if not self.owns(p)]:
            del self.state[p]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        W = self.world_size
        pending = None  # the previous chunk's all-gather, applied once the next chunk's work is queued
        for group, chunk in self._chunks():
            mine = chunk[self.rank] if self.rank < len(chunk) else None
            shared = self.local(mine, group) if mine is not None and mine.grad is not None else None
            if W == 1:
                self.receive(chunk, [shared], group)
                continue
            sent = (shared if shared is not None else self.placeholder(chunk[0])).flatten()
            gathered = sent.new_empty(W * sent.numel())  # flat: gloo only splits the output along dim 0
            handle = _all_gather(gathered, sent, async_op=True)
            if pending is not None:
                self._finish(*pending)
            pending = (handle, gathered, chunk, group)
        if pending is not None:
            self._finish(*pending)
        return loss

    def _finish(self, handle, gathered: Tensor, chunk: list[Tensor], group: dict) -> None:
        handle.wait()
        self.receive(chunk, gathered.view(self.world_size, -1), group)
