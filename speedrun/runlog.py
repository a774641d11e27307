"""What a run writes for people and programs: log.txt (the record scripts' line format) and
metrics.jsonl (one JSON object per logged step). Only rank 0 writes."""

from __future__ import annotations

import json
import platform
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


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


class RunLog:
    def __init__(self, out_dir: Path | None, *, append: bool = False):
        self.out_dir = out_dir
        self._log = self._metrics = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            mode = "a" if append else "w"
            self._log = open(out_dir / "log.txt", mode, buffering=1)
            self._metrics = open(out_dir / "metrics.jsonl", mode, buffering=1)

    def header(self, device: torch.device, world_size: int, extra: list[str]) -> None:
        self.line(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}")
        self.line(f"device: {device_description(device)}  world_size: {world_size}")
        for text in extra:
            self.line(text)

    def line(self, text: str, echo: bool = False) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
        if echo:
            print(text, flush=True)

    def metrics(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
