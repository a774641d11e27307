"""Muon: momentum SGD whose update is orthogonalised by Newton–Schulz, for the hidden matrices.

Under torch.distributed with W > 1 ranks, Muon is sharded: each rank orthogonalises a 1/W share
of the hidden matrices and the updates are all-gathered, so Muon's momentum buffers exist only on
the rank that owns the matrix. Adam's state is replicated on every rank.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from speedrun.config import OptimConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Newer torch renamed all_gather_into_tensor and deprecated the old name; torch 2.9 has only the old
# one, and a build without distributed support has neither (it never needs them: world size is 1).
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise every matrix in G (shape (..., m, n)), in bf16.

    The quintic's coefficients push small singular values up fast rather than converging exactly,
    so the result is roughly U S' V^T with S' spread over about [0.5, 1.5], not U V^T; that is
    enough for Muon and needs only a handful of steps."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


@functools.cache
def _compiled_newton_schulz():
    # On GPUs the five iterations fuse into a few kernels; on CPU compiling costs more than it saves.
    return torch.compile(newton_schulz)


class Muon(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum whose update is orthogonalised by `newton_schulz` and scaled by
    sqrt(max(1, rows / cols)). Parameters must be at least 2-D; leading dimensions of 3-D and
    higher parameters are a batch of separate matrices (e.g. a fused (3, d, d) qkv weight).
    `weight_decay` is decoupled (p *= 1 - lr * wd) and applied before the update, as in torch.optim.Muon.

    Sharding: if torch.distributed is initialised with W > 1 ranks when this is built, the
    parameters of each group are bucketed by (numel, dtype, device) in order, and bucket entry i
    belongs to rank i % W. The buckets are walked in chunks of W: each rank updates its owned
    parameter's momentum and orthogonalises it (a rank without one in the last, short chunk sends
    zeros), then an async all-gather shares the W updates while the next chunk is computed, and
    every rank applies every update. Gradients must already be averaged across ranks, and a
    parameter's grad must be None on all ranks or on none. The result equals single-process Muon.

    State: a rank holds momentum buffers only for the parameters it owns (`owns(p)`), so
    `state_dict()` is local, keyed by parameter index as usual, and holds that rank's share only; a
    complete checkpoint is the union of all ranks' state dicts. `load_state_dict()` accepts any
    such union (from any world size) and keeps only the entries this rank owns.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs parameters with at least 2 dimensions, got shape {tuple(p.shape)}")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1

    def _chunks(self):
        """Yield (group, chunk): up to world_size same-size parameters, chunk[r] owned by rank r."""
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                buckets.setdefault((p.numel(), p.dtype, p.device), []).append(p)
            for bucket in buckets.values():
                for i in range(0, len(bucket), self.world_size):
                    yield group, bucket[i:i + self.world_size]

    def owns(self, p: Tensor) -> bool:
        """Whether this rank keeps p's momentum buffer."""
        return any(self.rank < len(chunk) and chunk[self.rank] is p for _, chunk in self._chunks())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p in [p for p in self.state if not self.owns(p)]:
            del self.state[p]

    def _orthogonalised_update(self, p: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        return (_compiled_newton_schulz() if g.is_cuda else newton_schulz)(g, group["ns_steps"])

    @staticmethod
    def _apply(chunk: list[Tensor], updates, group: dict) -> None:
        for p, u in zip(chunk, updates):  # u is None where p has no grad
            if p.grad is None:
                continue
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(u.view_as(p), alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)

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
            update = self._orthogonalised_update(mine, group) if mine is not None and mine.grad is not None else None
            if W == 1:
                self._apply(chunk, [update], group)
                continue
            if update is None:
                update = torch.zeros(chunk[0].shape, dtype=torch.bfloat16, device=chunk[0].device)
            gathered = update.new_empty(W * update.numel())  # flat: gloo only splits the output along dim 0
            handle = _all_gather(gathered, update.flatten(), async_op=True)
            if pending is not None:
                self._finish(*pending)
            pending = (handle, gathered, chunk, group)
        if pending is not None:
            self._finish(*pending)
        return loss

    def _finish(self, handle, gathered: Tensor, chunk: list[Tensor], group: dict) -> None:
        handle.wait()
        self._apply(chunk, gathered.view(self.world_size, -1), group)




def build(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> Muon:
    """Muon over `groups` (each with its own lr and weight_decay); `fused` has no meaning here."""
    return Muon(groups, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps)
