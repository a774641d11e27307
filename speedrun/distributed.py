"""Process-group set-up from torchrun's environment and gradient averaging that overlaps backward."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from speedrun.errors import UsageError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def use_expandable_segments() -> None:
    """The record's allocator setting: growing segments instead of fixed blocks, so the changing
    shapes of validation and training do not fragment GPU memory. It is read when CUDA first
    allocates, so it must be set before that; a user's own setting wins. Under its name since torch
    2.9, PYTORCH_ALLOC_CONF: torch 2.9 warns on every start of a process that sets the old
    PYTORCH_CUDA_ALLOC_CONF, on CPU too."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def backend_name() -> str:
    """The process-group backend, or "none" for a single process."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def setup(device_preference: str) -> Runtime:
    """One process per device under torchrun (RANK/WORLD_SIZE/LOCAL_RANK), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://"))
        # After torchrun restarts a failed job the workers may reach the same store as the failed
        # attempt; without a per-attempt namespace a rank can read a dead peer's address from it.
        store = dist.PrefixStore(f"speedrun/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights, whatever its RNG did."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


class GradientAverager:
    """Averages gradients across ranks. On the last micro-step of an optimizer step each parameter's
    all-reduce is launched from its post-accumulate hook as soon as autograd has produced that
    gradient; `wait()` joins them before the optimizer step.

    Whether that overlaps backward depends on how backward runs: an eager backward produces
    gradients layer by layer, so the all-reduces of late layers run while early layers are still
    differentiated; a compiled model's backward is one graph that hands over every gradient when
    it ends, so the hooks fire together after it and communication does not overlap computation
    (docs/distributed.md)."""

    def __init__(self, params: list[torch.nn.Parameter], world_size: int):
        self.world_size = world_size
        self.sync = False
        self.handles: list[tuple[torch.Tensor, dist.Work]] = []
        # NCCL averages in the reduction kernel; gloo has no AVG, so there it is a sum and a divide
        self.average_in_reduce = world_size > 1 and dist.get_backend() == "nccl"
        if world_size > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._launch)

    def _launch(self, p: torch.Tensor) -> None:
        if self.sync:
            op = dist.ReduceOp.AVG if self.average_in_reduce else dist.ReduceOp.SUM
            self.handles.append((p.grad, dist.all_reduce(p.grad, op=op, async_op=True)))

    def wait(self) -> None:
        for grad, handle in self.handles:
            handle.wait()
            if not self.average_in_reduce:
                grad.div_(self.world_size)
        self.handles.clear()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
