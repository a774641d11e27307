"""NorMuon: Muon whose orthogonalised update is normalised per row or column, for the hidden
matrices; the optimizer of the July-2026 NanoGPT speedrun record (record-2026.md §2.2–2.4).

Per matrix and step: Nesterov momentum in fp32; orthogonalise (optim.orthogonalizer, the record:
Polar Express); divide each row (tall or square matrices) or column (wide ones) by the root of a
running mean of its squares (β2 0.9) and give the matrix back its Frobenius norm; weight decay
(decoupled, or the record's cautious decay); step with lr·sqrt(max(1, m/n)).

Which matrices a parameter holds comes from the tag `matrix_layout` the model sets on it:
- ("qkv", head_dim): q, k and v stacked, (3, n_head·head_dim, model_dim). With qk_blocks =
  "head_pair" Q and K are n_head/2 matrices of (2·head_dim, model_dim) each (the record: 6 blocks
  of 256×768 per layer) and V one; with "matrix", q, k and v are three matrices.
- ("mlp_out",): the MLP output projection (model_dim, hidden), seen transposed, (hidden, model_dim),
  as the record stores it: sqrt(m/n) is 2 for a 4× MLP, and its lr also gets lr_mul_mlp_out.
An untagged parameter is its last two dimensions, any leading ones a batch.

bf16 parameters keep the low 16 bits of their fp32 value in the state ("low_bits"): each step
rebuilds the fp32 value, updates it and truncates it again (the record's mixed-precision weights),
so a bf16 run follows an fp32 run bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from speedrun.config import OptimConfig
from speedrun.optim.orthogonalize import ORTHOGONALIZERS, orthogonalize, orthogonalize_dtype
from speedrun.optim.sharded import ShardedOptimizer

QK_BLOCKS = ("matrix", "head_pair")
WEIGHT_DECAY_MODES = ("decoupled", "cautious")


@dataclass(frozen=True)
class Matrices:
    """A batch of same-shape matrices of one parameter: `select` maps any tensor shaped like the
    parameter to a (batch, m, n) view of it; `lr_mul` multiplies the group's lr for them."""
    select: Callable[[Tensor], Tensor]
    lr_mul: float


def _last_two(x: Tensor) -> Tensor:
    return x.view(-1, *x.shape[-2:])


def _transposed(x: Tensor) -> Tensor:
    return x.mT.unsqueeze(0)


def _qk_head_pairs(x: Tensor, rows: int) -> Tensor:
    # q and k are contiguous, so their rows split into blocks of `rows` without a copy
    return x[:2].view(-1, rows, x.size(-1))


def _v(x: Tensor) -> Tensor:
    return x[2:]


def matrices(p: Tensor, qk_blocks: str, lr_mul_mlp_out: float) -> list[Matrices]:
    """How NorMuon splits p into matrices (see the module docstring), each batch with its lr factor
    sqrt(max(1, m/n)), times lr_mul_mlp_out for the MLP output projection."""
    layout = getattr(p, "matrix_layout", None)
    selects, mul = [_last_two], 1.0
    if layout is not None and layout[0] == "mlp_out":
        selects, mul = [_transposed], lr_mul_mlp_out
    elif layout is not None and layout[0] == "qkv":
        if qk_blocks == "head_pair":
            if p.ndim != 3 or p.size(0) != 3 or p.size(1) % (2 * layout[1]):
                raise ValueError(f"qk_blocks = head_pair needs a qkv parameter (3, n_head·head_dim, model_dim) with an "
                                 f"even number of heads; got shape {tuple(p.shape)} with head_dim {layout[1]}")
            selects = [functools.partial(_qk_head_pairs, rows=2 * layout[1]), _v]
    elif layout is not None:
        raise ValueError(f"unknown matrix_layout {layout!r}; expected ('qkv', head_dim) or ('mlp_out',)")
    shapes = [select(p.detach()).shape for select in selects]
    return [Matrices(select, mul * max(1.0, m / n) ** 0.5) for select, (_, m, n) in zip(selects, shapes)]


def _moment_shape(shape: torch.Size) -> tuple[int, int, int]:
    batch, m, n = shape
    return (batch, m, 1) if m >= n else (batch, 1, n)


def _normalised(O: Tensor, V: Tensor, beta2: float) -> Tensor:
    """NorMuon's variance reduction of orthogonalised matrices O (batch, m, n), in fp32:
    V ← lerp(V, mean of O² per row (m ≥ n) or per column, 1 − β2), D = rsqrt(max(V, 1e-10)),
    Ô = (O·D)·‖O‖_F/‖O·D‖_F per matrix. Rows (columns) that have been large are damped and the
    update keeps the size the orthogonaliser gave it."""
    O = O.float()
    V.lerp_(O.square().mean(dim=-1 if O.size(-2) >= O.size(-1) else -2, keepdim=True), 1 - beta2)
    scaled = O * V.clamp_min(1e-10).rsqrt()
    return scaled * (O.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def _decay_and_step(w: Tensor, update: Tensor, lr: float, lr_eff: float, wd: float, cautious: bool) -> None:
    """w ← w − decay − lr_eff·update, in place. Cautious (the record): decay lr_eff·(wd·lr)·w only
    where update·w ≥ 0, i.e. where the update already pulls w towards zero, so decay ∝ lr². Decoupled:
    w·(1 − lr·wd) first, as torch.optim.Muon and our Muon."""
    if wd and cautious:
        w.sub_(w * (update * w >= 0) * (lr_eff * wd * lr))
    elif wd:
        w.mul_(1 - lr * wd)
    w.add_(update, alpha=-lr_eff)


def _stacked(batches: list[Tensor]) -> Tensor:
    """(batch, m, n) tensors as one batch: the tensor itself if there is one, else a copy."""
    return batches[0] if len(batches) == 1 else torch.cat(batches)


def _master(p: Tensor, low_bits: Tensor | None) -> Tensor:
    """p's fp32 value: p itself, or a bf16 p's bits above the low 16 bits kept in the state."""
    if low_bits is None:
        return p
    high = p.view(torch.int16).to(torch.int32) << 16  # the sign extension is shifted out
    return (high | low_bits.to(torch.int32)).view(torch.float32)


def _store(p: Tensor, master: Tensor, low_bits: Tensor | None) -> None:
    """Split an updated fp32 master back into a bf16 p (its high 16 bits: truncation, as the
    record) and the low bits; an fp32 p was updated in place."""
    if low_bits is None:
        return
    bits = master.view(torch.int32)
    low_bits.copy_(bits & 0xFFFF)
    p.copy_((bits >> 16).to(torch.int16).view(torch.bfloat16))


class NorMuon(ShardedOptimizer):
    """NorMuon (see the module docstring). Defaults are the record's, except weight_decay (the
    record: 1.2, with lr 0.023). Parameters must be at least 2-D, float32 or bfloat16.

    Sharding (`speedrun.optim.sharded`): parameters bucket by (the shapes of the matrices they are
    seen as, dtype, device), so the MLP's input and transposed output projections share a bucket.
    Gradients arrive as each rank computed them (`reduces_gradients`: the trainer's
    GradientAverager leaves them alone) and are reduce-scattered at the start of `step`, every
    chunk's launched before the first is awaited, so each owner gets the mean over the ranks of
    its parameter's gradient; the owner alone keeps the parameter's state and updates it, and the
    new values are all-gathered (a bf16 parameter's low bits exist only on its owner):
    reduce-scatter → update → all-gather, as the record. A parameter is owned whole, head-pair
    blocks included: its state is one entry of the state_dict, which checkpoint.py merges across
    ranks per parameter. A parameter's grad must be None on all ranks or on none. The result
    equals single-process NorMuon over the mean gradient (bit for bit where the ranks' sum is exact).

    State: `owns(p)`, `state_dict()` (this rank's share) and `load_state_dict()` (any union of
    ranks' shares, from any world size; keeps what this rank owns) behave as Muon's. State tensors
    keep their saved dtype (torch would cast them to a bf16 parameter's).
    """

    def __init__(self, params, lr: float = 0.023, momentum: float = 0.95, nesterov: bool = True, beta2: float = 0.9,
                 weight_decay: float = 0.0, ns_steps: int = 5, orthogonalizer: str = "polar_express",
                 qk_blocks: str = "head_pair", lr_mul_mlp_out: float = 2.0, weight_decay_mode: str = "cautious",
                 orthogonalize_dtype: torch.dtype = torch.bfloat16):
        for name, value, choices in (("orthogonalizer", orthogonalizer, tuple(ORTHOGONALIZERS)),
                                     ("qk_blocks", qk_blocks, QK_BLOCKS),
                                     ("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)):
            if value not in choices:
                raise ValueError(f"unknown {name} '{value}'; expected {', '.join(choices)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, beta2=beta2,
                                      weight_decay=weight_decay, ns_steps=ns_steps))
        self.orthogonalizer, self.qk_blocks, self.lr_mul_mlp_out = orthogonalizer, qk_blocks, lr_mul_mlp_out
        self.cautious = weight_decay_mode == "cautious"
        self.orthogonalize_dtype = orthogonalize_dtype
        for group in self.param_groups:
            for p in group["params"]:
                self.matrices(p)  # refuses a malformed layout now rather than at the first step

    def matrices(self, p: Tensor) -> list[Matrices]:
        """The batches of matrices p is orthogonalised as, each with its lr factor."""
        return matrices(p, self.qk_blocks, self.lr_mul_mlp_out)

    def bucket_key(self, p: Tensor) -> tuple:
        return tuple(tuple(m.select(p.detach()).shape) for m in self.matrices(p)), p.dtype, p.device

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, saved in state_dict["state"].items():
            p = params[i]
            if not self.owns(p):
                self.state.pop(p, None)
                continue
            # torch casts every floating state tensor to the parameter's dtype: undo that, from the source
            self.state[p] = {k: [t.to(p.device) for t in v] if isinstance(v, list) else v.to(p.device)
                             for k, v in saved.items()}
            self._check_state(p)

    def _check_state(self, p: Tensor) -> None:
        state = self.state[p]
        shapes = [_moment_shape(m.select(p.detach()).shape) for m in self.matrices(p)]
        if [tuple(v.shape) for v in state["second_moments"]] != shapes:
            raise ValueError(f"NorMuon state of a {tuple(p.shape)} parameter holds second moments of shapes "
                             f"{[tuple(v.shape) for v in state['second_moments']]}, expected {shapes} "
                             "(saved with another optim.qk_blocks?)")
        if ("low_bits" in state) != (p.dtype == torch.bfloat16):
            raise ValueError(f"NorMuon state of a {p.dtype} parameter {'has' if 'low_bits' in state else 'lacks'} "
                             "the low 16 bits of a bfloat16 one (saved with another optim.hidden_weight_dtype?)")

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"NorMuon updates float32 or bfloat16 parameters, got {p.dtype}")
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["second_moments"] = [torch.zeros(_moment_shape(m.select(p.detach()).shape), dtype=torch.float32,
                                                   device=p.device) for m in self.matrices(p)]
            if p.dtype == torch.bfloat16:
                state["low_bits"] = torch.zeros(p.shape, dtype=torch.uint16, device=p.device)
        return state

    def _update(self, params: list[Tensor], group: dict) -> None:
        """One NorMuon step of `params`, in place: one parameter, or a bucket's (their matrices have
        the same shapes), whose same-shape matrices are orthogonalised and normalised as one batch."""
        states = [self._state(p) for p in params]
        gs, masters = [], []
        for p, state in zip(params, states):
            buf, grad = state["momentum_buffer"], p.grad.float()
            buf.lerp_(grad, 1 - group["momentum"])
            gs.append(grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
            masters.append(_master(p, state.get("low_bits")))
        layouts = [self.matrices(p) for p in params]
        for i in range(len(layouts[0])):
            mats = [layout[i] for layout in layouts]
            selected = [m.select(g) for m, g in zip(mats, gs)]
            sizes = [x.size(0) for x in selected]
            O = orthogonalize(_stacked(selected), self.orthogonalizer, group["ns_steps"], self.orthogonalize_dtype)
            moments = [state["second_moments"][i] for state in states]
            V = _stacked(moments)
            updates = _normalised(O, V, group["beta2"]).split(sizes)
            if len(moments) > 1:  # V was a copy
                for moment, part in zip(moments, V.split(sizes)):
                    moment.copy_(part)
            for m, master, update in zip(mats, masters, updates):
                _decay_and_step(m.select(master), update, group["lr"], group["lr"] * m.lr_mul, group["weight_decay"],
                                self.cautious)
        for p, master, state in zip(params, masters, states):
            _store(p, master, state.get("low_bits"))

    reduces_gradients = True

    @torch.no_grad()
    def step(self, closure=None):
        if self.world_size > 1:
            self._reduce_scatter_gradients()
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One process owns every parameter: a bucket's are updated together, since per matrix the
        # orthogonaliser is dozens of small kernels (docs/benchmarks.md)
        for group, bucket in self._buckets():
            params = [p for p in bucket if p.grad is not None]
            if params:
                self._update(params, group)
        return loss

    def _reduce_scatter_gradients(self) -> None:
        """Replace the grad of every parameter this rank owns by its mean over the ranks; the other
        parameters' grads are left as they are (only whether they are None is read)."""
        average = dist.get_backend() == "nccl"  # gloo has no AVG: a sum, then a divide
        pending = []
        for _, chunk in self._chunks():
            if all(p.grad is None for p in chunk):
                continue
            rows = [p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in chunk]
            rows += [rows[0].new_zeros(rows[0].numel())] * (self.world_size - len(chunk))  # a short last chunk
            mine = rows[0].new_empty(rows[0].numel())
            handle = dist.reduce_scatter_tensor(mine, torch.cat(rows), op=dist.ReduceOp.AVG if average else
                                                dist.ReduceOp.SUM, async_op=True)
            pending.append((handle, chunk, mine))
        for handle, chunk, mine in pending:
            handle.wait()
            if self.rank < len(chunk) and chunk[self.rank].grad is not None:
                p = chunk[self.rank]
                p.grad = (mine if average else mine.div_(self.world_size)).view_as(p)

    def local(self, p: Tensor, group: dict) -> Tensor:
        """Update p, its owner; its new value is what the other ranks receive."""
        self._update([p], group)
        return p.detach()

    def placeholder(self, p: Tensor) -> Tensor:
        return p.new_zeros(p.shape)

    def receive(self, chunk: list[Tensor], values, group: dict) -> None:
        for r, (p, value) in enumerate(zip(chunk, values)):
            if p.grad is not None and r != self.rank:
                p.copy_(value.view_as(p))


def build(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> NorMuon:
    """NorMuon over `groups` (each with its own lr and weight_decay); `fused` has no meaning here."""
    tagged = any(getattr(p, "matrix_layout", None) for group in groups for p in group["params"])
    if not tagged and (cfg.qk_blocks == "head_pair" or cfg.lr_mul_mlp_out != 1.0):
        # without the tags both settings would be silently ignored
        raise ValueError("optim.qk_blocks = head_pair and optim.lr_mul_mlp_out need the matrix_layout tags the model "
                         "sets on its parameters, and no hidden parameter has one (copy.deepcopy and meta-device "
                         "models drop them)")
    return NorMuon(groups, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, beta2=cfg.normuon_beta2,
                   ns_steps=cfg.ns_steps, orthogonalizer=cfg.orthogonalizer, qk_blocks=cfg.qk_blocks,
                   lr_mul_mlp_out=cfg.lr_mul_mlp_out, weight_decay_mode=cfg.weight_decay_mode,
                   orthogonalize_dtype=orthogonalize_dtype(cfg, groups))
