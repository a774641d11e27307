"""What a run writes for people and programs: log.txt (the record scripts' line format) and
metrics.jsonl (one JSON object per logged step). Only rank 0 writes."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; MFU is left out elsewhere.
PEAK_BF16_FLOPS = {
    "H100": 989.5e12,
    "H200": 989.5e12,
    "H800": 989.5e12,
    "A100": 312e12,
    "L40S": 362e12,
    "4090": 165.2e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: the model's FLOP/s at this throughput over the peak of every device
    (`peak_flops` of one; None where it is unknown, and then so is the MFU)."""
    return None if peak is None else flops_per_token * tokens_per_s / (peak * world_size)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


class RunLog:
    """`tensorboard` and `wandb` mirror every metrics.jsonl record to those tools (scalars keyed by
    the record's field names, x = step)."""

    def __init__(self, out_dir: Path | None, *, append: bool = False, tensorboard: bool = False,
                 wandb: bool = False, config: dict | None = None):
        self.out_dir = out_dir
        self._log = self._metrics = self._tb = self._wandb = None
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._log = open(out_dir / "log.txt", mode, buffering=1)
        self._metrics = open(out_dir / "metrics.jsonl", mode, buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if wandb:
            self._wandb = _start_wandb(out_dir, config or {})

    def header(self, device: torch.device, world_size: int, extra: list[str]) -> None:
        self.line(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda or 'none'}")
        self.line(f"device: {device_description(device)}  world_size: {world_size}")
        for text in extra:
            self.line(text)

    def line(self, text: str, echo: bool = False) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
        if echo:
            print(text, flush=True)

    def metrics(self, record: dict) -> None:
        if self._metrics is None:
            return
        self._metrics.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(out_dir: Path, config: dict):
    import os

    try:
        import wandb
    except ImportError:
        from speedrun.errors import UsageError

        raise UsageError("--wandb needs the wandb package: pip install 'speedrun[wandb]'") from None
    # Without credentials or network, log offline into the run directory; `wandb sync` uploads later.
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "speedrun"), name=out_dir.name, dir=str(out_dir),
                      config=config)
