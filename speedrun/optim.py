"""Optimizers and their schedules: Muon for the hidden matrices, Adam for everything else (or a
single AdamW for the nanoGPT baseline), plus the per-step lr and Muon-momentum schedules.

Under torch.distributed with W > 1 ranks, Muon is sharded: each rank orthogonalises a 1/W share
of the hidden matrices and the updates are all-gathered, so Muon's momentum buffers exist only on
the rank that owns the matrix. Adam's state is replicated on every rank.
"""

from __future__ import annotations

import functools
import math

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


def build_optimizers(param_groups: dict[str, list[Tensor]], cfg: OptimConfig, fused: bool = False) -> list[torch.optim.Optimizer]:
    """Optimizers for the model's parameter groups ("hidden", "embed", "head" (absent when tied),
    "scalar"). Each group's starting lr is kept as group["base_lr"] for `apply_schedule`.

    Weight decay follows nanoGPT's rule in both modes: matrices (head, embeddings, hidden) decay,
    vectors and scalars never do. AdamW is used in the Muon mode too: with weight_decay = 0 (the
    speedrun setting) it is exactly Adam, and otherwise it decays decoupled from the gradient."""
    unknown = set(param_groups) - {"hidden", "embed", "head", "scalar"}
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}")
    adam = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused)
    if cfg.muon:
        lrs = {"head": cfg.lr_head, "embed": cfg.lr_embed, "scalar": cfg.lr_scalar}
        groups = [dict(params=list(param_groups[k]), lr=lr, weight_decay=0.0 if k == "scalar" else cfg.weight_decay)
                  for k, lr in lrs.items() if param_groups.get(k)]
        opts = [torch.optim.AdamW(groups, **adam)]
        if param_groups.get("hidden"):
            opts.append(Muon(param_groups["hidden"], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                             nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay))
    else:
        params = [p for k in ("hidden", "embed", "head", "scalar") for p in param_groups.get(k, [])]
        groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg.weight_decay),
                  dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
        opts = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr_adam, **adam)]
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Factor on every base lr at `step` (0-based) of a `total_steps` run; reaches final_lr_frac at
    step == total_steps."""
    step = min(max(step, 0), total_steps)
    # Step 0 gets a nonzero lr so no step is wasted; the ramp reaches 1 at step warmup_steps - 1.
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    final = cfg.final_lr_frac
    if cfg.schedule == "trapezoid":
        left = (total_steps - step) / total_steps  # fraction of the run still to go
        w = min(left / cfg.cooldown_frac, 1.0) if cfg.cooldown_frac > 0 else 1.0
        return warm * (w + (1 - w) * final)
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return warm
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{cfg.schedule}'")


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def apply_schedule(opts: list[torch.optim.Optimizer], step: int, total_steps: int, cfg: OptimConfig) -> None:
    """Set every group's lr (and Muon's momentum) for the optimizer step about to run at `step`."""
    mult = lr_multiplier(step, total_steps, cfg)
    momentum = muon_momentum(step, cfg)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
            if isinstance(opt, Muon):
                group["momentum"] = momentum
