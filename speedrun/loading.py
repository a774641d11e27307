"""A model from a run, checkpoint or export folder: what `speedrun sample`, `speedrun eval` and
`speedrun export` load, and `from_pretrained` for folders that `speedrun export` wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speedrun import checkpoint
from speedrun.attention import Windows
from speedrun.stages import final_windows
from speedrun.config import Config, from_dict
from speedrun.distributed import pick_device
from speedrun.errors import DataError, UsageError, first_line
from speedrun.model import GPT

# An export folder's files (a checkpoint's weights have the same name)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _build(cfg: Config, weights: Path, device: torch.device) -> GPT:
    """The model in eval mode with `weights` copied into its float32 parameters, whatever dtype they
    were saved in (CUDA runs keep embedding tables in bf16)."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device=device)
    model.init_derived_buffers()
    checkpoint.load_weights(model, weights, str(device))
    return model.eval()


def _read_export_config(folder: Path) -> Config:
    path = folder / CONFIG
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, a 5000-digit number
        raise DataError(f"{path}: cannot read the config ({first_line(e)})") from None
    return from_dict(table, str(path))


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The model `speedrun export` wrote to `folder`, in eval mode and float32."""
    folder = Path(folder)
    return _build(_read_export_config(folder), folder / WEIGHTS, torch.device(device))


def load_model(path: str | Path, device: str | torch.device = "auto") -> tuple[Config, GPT]:
    """(config, model in eval mode on `device`, float32) from a run directory (its newest
    checkpoint), a checkpoint directory or an export folder. `device` "auto" picks CUDA if present.
    To run it as training did on that device (bf16 activations on CUDA, compiled where shapes are
    fixed), pass it through speedrun.prepare first."""
    path = Path(path)
    device = pick_device(device) if device in ("auto", "cpu", "cuda") else torch.device(device)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        cfg, weights = _read_export_config(path), path / WEIGHTS
    else:
        found = checkpoint.newest(path)
        if found is None:
            raise UsageError(f"{path}: no checkpoint there (expected a run directory with "
                             f"checkpoints/{checkpoint.PREFIX}*, a checkpoint directory or a folder written by "
                             "`speedrun export`)")
        cfg, weights = checkpoint.read_config(found), found / WEIGHTS
    return cfg, _build(cfg, weights, device)


def final_window(cfg: Config) -> Windows:
    """The attention windows of the run's final validation, which its weights are best at."""
    return Windows(*final_windows(cfg))
