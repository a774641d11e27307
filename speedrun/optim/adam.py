"""Adam for embeddings, the head, scalars, and every matrix in the nanoGPT baseline.

The default settings (optim.weight_decay_mode = "decoupled", optim.adam_update_every = 1) build
torch.optim.AdamW: the baseline, and the fastest (fused on CUDA). The July-2026 record's Adam differs
in two ways, each a setting, and builds `RecordAdam` instead.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from speedrun.config import OptimConfig


def _adam_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                 eps: float, step_size: Tensor, decay: Tensor, cautious: bool, pending: Tensor | None = None) -> None:
    """One Adam update of `p` from an fp32 gradient (plus `pending`, the window's earlier gradients,
    where there are some), with fp32 moments. `decay` is lr²·wd when `cautious`, else lr·wd. The step
    size and decay are 0-d tensors, so that a compiled update does not recompile as the lr changes."""
    if pending is not None:
        grad = pending + grad
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # eps is added to sqrt(v) itself, not to the bias-corrected sqrt(v) as in torch.optim.AdamW:
    # the record's convention; the two differ only where sqrt(v) is comparable to eps.
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    if cautious:
        # Decay only the weights the update is already pulling towards zero (sign of u and p agree).
        update.add_(torch.where(update * p > 0, p.float(), 0.0) * decay)
    else:
        p.mul_(1 - decay)
    p.sub_(update)


class RecordAdam(torch.optim.Optimizer):
    """Adam as the July-2026 NanoGPT speedrun record runs it. Named for the record rather than for
    one feature because it carries both of the record's changes, each optional:

    - update_every = N (the record: 2): Adam updates only at steps N-1, 2N-1, ... (0-based), on the
      sum of the gradients of the N steps since its last update. `step()` must still be called every
      step: it adds the gradient to a pending fp32 sum (state "grad_sum", there only while pending,
      so a checkpoint taken between updates resumes exactly), and updates on the last step of each
      window. Bias correction counts updates k, not steps: step_size = lr·sqrt(1-β2^k)/(1-β1^k),
      u = step_size·m/(sqrt(v) + eps) (the record: eps 1e-10), moments in fp32.
    - weight_decay_mode "cautious" (the record): p ← p - u - lr²·wd·[u·p > 0]·p, the decay ∝ lr²
      and only where update and weight agree in sign; "decoupled": p ← p·(1 - lr·wd) - u, AdamW's.
      lr is the group's current (scheduled) lr at the update.

    Per-group lr, betas, eps and weight_decay, as in torch.optim.AdamW; the record's come from the
    config (e.g. head and embedding: lr 0.008, betas (0.5, 0.95), wd 0.75; record-2026.md §4). Per-parameter state: "steps"
    (step() calls, the same for every parameter, so they all update on the same steps), "updates"
    (k), "exp_avg", "exp_avg_sq" and, between updates, "grad_sum". A parameter without a grad on a
    step adds nothing to its sum, as a zero gradient would; on an update step it updates if it had a
    grad on any step of the window, else it is left alone entirely (moments, weight and k unchanged),
    as torch's optimizers leave a parameter without a grad.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0, *, update_every: int = 1, weight_decay_mode: str = "decoupled",
                 compiled: bool = False):
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if weight_decay_mode not in ("decoupled", "cautious"):
            raise ValueError(f"weight_decay_mode must be 'decoupled' or 'cautious', got {weight_decay_mode!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.update_every = update_every
        self.cautious = weight_decay_mode == "cautious"
        # compiled: each parameter's update is one fused kernel instead of about ten passes over it
        self.compiled = compiled
        self._scalar_tensors: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to its parameter's dtype; the moments and pending sum of a bf16
        # parameter are fp32 on purpose, so put the saved tensors back as they were.
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                grads = self._window_grads(p)
                if grads is not None:
                    self._update(p, *grads, group)
        return loss

    def _window_grads(self, p: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """Count this step for `p`; if it updates now, return its window's gradients as (this step's,
        the fp32 sum of the earlier ones or None), else None (also when it had no gradient in the
        window) and keep p.grad in that sum."""
        state = self.state[p]
        if not state:
            state.update(steps=0, updates=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                         exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
        state["steps"] += 1
        pending = state.get("grad_sum")
        if state["steps"] % self.update_every == 0:
            state.pop("grad_sum", None)
            if p.grad is None:
                return None if pending is None else (pending, None)
            return p.grad.float(), pending
        if p.grad is not None:
            # A copy: the caller may zero p.grad in place before the next step.
            if pending is None:
                state["grad_sum"] = p.grad.to(torch.float32, copy=True)
            else:
                pending.add_(p.grad)
        return None

    def _update(self, p: Tensor, grad: Tensor, pending: Tensor | None, group: dict) -> None:
        state = self.state[p]
        state["updates"] += 1
        k, lr, wd = state["updates"], group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        step_size = lr * math.sqrt(1 - beta2 ** k) / (1 - beta1 ** k)
        decay = lr * lr * wd if self.cautious else lr * wd
        step_size_t, decay_t = self._scalars(p.device)
        # flat, so that parameters of one size share a compiled graph whatever their shape
        compiled = self.compiled and p.numel() >= COMPILE_MIN_NUMEL
        update = _compiled_adam_update() if compiled else _adam_update
        update(p.detach().view(-1), grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
               beta1, beta2, group["eps"], step_size_t.fill_(step_size), decay_t.fill_(decay), self.cautious,
               None if pending is None else pending.reshape(-1))

    def _scalars(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Two fp32 0-d tensors on `device` for the step size and decay, refilled at every update: a
        fill_ on a GPU is queued as any kernel, where a new tensor from a Python float would wait
        for the device."""
        if device not in self._scalar_tensors:
            self._scalar_tensors[device] = (torch.zeros((), device=device), torch.zeros((), device=device))
        return self._scalar_tensors[device]


# a smaller parameter (a gate, a scalar) updates eagerly: its update takes microseconds either way,
# and each of its sizes would add a graph
COMPILE_MIN_NUMEL = 65536


@functools.cache
def _compiled_adam_update():
    # One static graph per size (a handful of tables and heads): compiled with dynamic shapes, the
    # graph a cold cache compiled and the same graph loaded from the cache rounded differently, so a
    # run's losses depended on the state of the cache
    return torch.compile(_adam_update, dynamic=False)


def build(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer of the adam groups: torch.optim.AdamW (each group with its own lr and weight
    decay) for the default settings, else RecordAdam (one parameter at a time). `fused` picks
    AdamW's single-kernel implementation and RecordAdam's compiled update."""
    if cfg.weight_decay_mode == "decoupled" and cfg.adam_update_every == 1:
        return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused)
    return RecordAdam(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, update_every=cfg.adam_update_every,
                      weight_decay_mode=cfg.weight_decay_mode, compiled=fused)
