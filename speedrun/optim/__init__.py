"""Optimizers by kind, and the per-step schedules.

The model sorts its parameters into roles (GPT.param_groups: hidden, head, embed, scalar); each
role becomes one parameter group tagged with the `kind` of optimizer that updates it (the hidden
matrices: optim.hidden_optimizer; every other role: adam), its lr and its weight decay. Each kind
present builds one optimizer from its module's `build(groups, cfg, fused)`: a new optimizer is one
module and one entry in OPTIMIZERS. Schedules set group fields ("lr" from "base_lr", and
"momentum" where a group has one), whatever optimizer holds the group.
"""

from __future__ import annotations

import math

import torch

from speedrun.config import ROLES, Config, OptimConfig
from speedrun.optim import adam, muon, normuon
from speedrun.stages import scheduled_steps, step_plan
from speedrun.optim.muon import Muon
from speedrun.optim.normuon import NorMuon
from speedrun.optim.orthogonalize import NS_COEFFICIENTS, newton_schulz

__all__ = ["NS_COEFFICIENTS", "OPTIMIZERS", "Muon", "NorMuon", "apply_schedule", "build_optimizers", "lr_multiplier",
           "muon_momentum", "newton_schulz", "param_groups", "schedule_at"]

# Built in this order, which is also the order of a checkpoint's optimizer states.
OPTIMIZERS = {"adam": adam.build, "muon": muon.build, "normuon": normuon.build}



def param_groups(roles: dict[str, list[torch.Tensor]], cfg: OptimConfig) -> list[dict]:
    """One group per non-empty role, in ROLES order (which fixes the parameter indices a state_dict is
    keyed by): params, role, kind, lr (also kept as base_lr for the schedule), weight_decay and, for
    Adam's groups, betas. Matrices decay by optim.weight_decay, vectors and scalars never (nanoGPT's
    rule), unless optim.role_weight_decay says otherwise; optim.role_adam_betas likewise."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown parameter roles {sorted(unknown)}; expected {', '.join(ROLES)}")
    lrs = {"hidden": cfg.lr_hidden, "head": cfg.lr_head, "embed": cfg.lr_embed, "scalar": cfg.lr_scalar}
    groups = []
    for role in (r for r in ROLES if roles.get(r)):
        kind = cfg.hidden_optimizer if role == "hidden" else "adam"
        own = role in lrs  # the four first roles; the tagged ones default to scalar's lr and no decay
        lr = lrs[role] if own else cfg.role_lr.get(role, cfg.lr_scalar)
        decay = cfg.role_weight_decay.get(role, cfg.weight_decay if own and role != "scalar" else 0.0)
        group = dict(params=list(roles[role]), role=role, kind=kind, lr=lr, base_lr=lr, weight_decay=decay)
        if kind == "adam":
            group["betas"] = tuple(cfg.role_adam_betas.get(role, cfg.adam_betas))
        groups.append(group)
    return groups


def build_optimizers(roles: dict[str, list[torch.Tensor]], cfg: OptimConfig, fused: bool = False) -> list[torch.optim.Optimizer]:
    """One optimizer per kind in use, in OPTIMIZERS order, each over its groups."""
    groups = param_groups(roles, cfg)
    return [build([g for g in groups if g["kind"] == kind], cfg, fused)
            for kind, build in OPTIMIZERS.items() if any(g["kind"] == kind for g in groups)]


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig, stage_factor: float = 1.0) -> float:
    """Factor on every base lr at `step` (0-based) of a `total_steps` run; reaches final_lr_frac at
    step == total_steps. `stage_factor` (the 2026 record's stage lr) scales the part above the
    cooldown's floor: stage·(1 - τ) + final·τ, τ the cooldown's progress."""
    step = min(max(step, 0), total_steps)
    # Step 0 gets a nonzero lr so no step is wasted; the ramp reaches 1 at step warmup_steps - 1.
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    final = cfg.final_lr_frac
    if cfg.schedule == "trapezoid":
        left = (total_steps - step) / total_steps  # fraction of the run still to go
        w = min(left / cfg.cooldown_frac, 1.0) if cfg.cooldown_frac > 0 else 1.0
        return warm * (stage_factor * w + (1 - w) * final)
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return warm * stage_factor
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return final + (stage_factor - final) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{cfg.schedule}'")


def muon_momentum(step: int, cfg: OptimConfig, total_steps: int = 0) -> float:
    """Muon's momentum: muon_momentum_start up to muon_momentum over the warm-up steps, and back
    down over the last muon_momentum_cooldown_steps of a `total_steps` run (the 2026 record)."""
    start, peak = cfg.muon_momentum_start, cfg.muon_momentum
    cooldown_from = total_steps - cfg.muon_momentum_cooldown_steps
    if cfg.muon_momentum_cooldown_steps > 0 and step > cooldown_from:
        return peak - (step - cooldown_from) / cfg.muon_momentum_cooldown_steps * (peak - start)
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * peak


def schedule_at(step: int, cfg: Config) -> tuple[float, float]:
    """(lr factor, Muon momentum) for training step `step`, stages included."""
    lr = lr_multiplier(step, scheduled_steps(cfg), cfg.optim, step_plan(step, cfg).lr_factor)
    return lr, muon_momentum(step, cfg.optim, cfg.train.steps)


def apply_schedule(opts: list[torch.optim.Optimizer], step: int, cfg: Config) -> None:
    """Set every group's lr, and the momentum of groups that have one, for the step about to run."""
    mult, momentum = schedule_at(step, cfg)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
            if "momentum" in group:
                group["momentum"] = momentum
