"""Muon: momentum SGD whose update is orthogonalised (optim.orthogonalizer: Newton–Schulz or Polar
Express, `speedrun.optim.orthogonalize`), for the hidden matrices.

Under torch.distributed with W > 1 ranks, Muon is sharded (`speedrun.optim.sharded`): each rank
orthogonalises a 1/W share of the hidden matrices and the updates are all-gathered, so Muon's
momentum buffers exist only on the rank that owns the matrix. Adam's state is replicated on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from speedrun.config import OptimConfig
from speedrun.optim.orthogonalize import ORTHOGONALIZERS, orthogonalize, orthogonalize_dtype
from speedrun.optim.sharded import ShardedOptimizer


class Muon(ShardedOptimizer):
    """SGD with (Nesterov) momentum whose update is orthogonalised by ORTHOGONALIZERS[orthogonalizer]
    (Newton–Schulz runs ns_steps iterations, Polar Express its five) and scaled by
    sqrt(max(1, rows / cols)). Parameters must be at least 2-D; leading dimensions of 3-D and
    higher parameters are a batch of separate matrices (e.g. a fused (3, d, d) qkv weight).
    `weight_decay` is decoupled (p *= 1 - lr * wd) and applied before the update, as in torch.optim.Muon.

    Sharding (`speedrun.optim.sharded`): parameters bucket by (numel, dtype, device); the owner
    updates a parameter's momentum and orthogonalises it, the updates are all-gathered in bf16 and
    every rank applies every update. State: the momentum buffers of the parameters this rank owns.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, orthogonalizer: str = "newton_schulz",
                 orthogonalize_dtype: torch.dtype = torch.bfloat16):
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer '{orthogonalizer}'; expected {', '.join(ORTHOGONALIZERS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.orthogonalizer, self.orthogonalize_dtype = orthogonalizer, orthogonalize_dtype

    def bucket_key(self, p: Tensor) -> tuple:
        return p.numel(), p.dtype, p.device

    def local(self, p: Tensor, group: dict) -> Tensor:
        """p's orthogonalised update."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        return orthogonalize(g, self.orthogonalizer, group["ns_steps"], self.orthogonalize_dtype)

    def placeholder(self, p: Tensor) -> Tensor:
        return torch.zeros(p.shape, dtype=self.orthogonalize_dtype, device=p.device)

    def receive(self, chunk: list[Tensor], updates, group: dict) -> None:
        for p, u in zip(chunk, updates):  # u is None where p has no grad
            if p.grad is None:
                continue
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(u.view_as(p), alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)


def build(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> Muon:
    """Muon over `groups` (each with its own lr and weight_decay); `fused` has no meaning here."""
    return Muon(groups, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps,
                orthogonalizer=cfg.orthogonalizer, orthogonalize_dtype=orthogonalize_dtype(cfg, groups))
