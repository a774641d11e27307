"""`speedrun export`: a trained model as a self-contained folder (safetensors weights, the resolved
config as JSON, a README), and the loaders that turn a run, checkpoint or export folder back into
a model, shared by `speedrun sample` and `speedrun eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights, save_model

from speedrun import checkpoint
from speedrun.attention import window_tokens
from speedrun.config import Config, ConfigError, from_dict, to_dict
from speedrun.distributed import pick_device
from speedrun.errors import DataError, UsageError, first_line
from speedrun.model import GPT
from speedrun.prepare import activation_dtype

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

README = """# {name}

A GPT trained with `speedrun` ({description}).

- `model.safetensors`: the weights, float32, under the parameter names of `speedrun.model.GPT`
- `config.json`: the run's fully resolved configuration; `model` builds the network

Load it with `speedrun` installed:

```python
from speedrun.export import from_pretrained

model = from_pretrained("{name}")  # speedrun.model.GPT, eval mode, float32
logits = model(tokens)  # tokens: (B, T) GPT-2 token ids, each document starting with 50256
```

The model attends within a window of {window} tokens, as at the end of training; pass
`window_tokens={window}` to `model(...)` to match. Or, from the command line:
`speedrun sample {name} --prompt "..."`, `speedrun eval hellaswag {name}`.
"""


def _build(cfg: Config, weights: Path, device: torch.device) -> GPT:
    """The model in eval mode with `weights` copied into its float32 parameters, whatever dtype they
    were saved in (CUDA runs keep embedding tables in bf16)."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device=device)
    try:
        load_weights(model, str(weights), strict=True, device=str(device))
    except Exception as e:  # safetensors raises several types; all mean the same thing here
        raise DataError(f"{weights}: cannot load weights ({first_line(e)})") from None
    return model.eval()


def _read_export_config(folder: Path) -> Config:
    path = folder / CONFIG
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, a 5000-digit number
        raise DataError(f"{path}: cannot read the config ({first_line(e)})") from None
    try:
        return from_dict(table, str(path))
    except ConfigError as e:  # a damaged export is bad data (exit 1), whatever value the damage hit
        raise DataError(str(e) if str(e).startswith(str(path)) else f"{path}: damaged ({e})") from None


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The model `speedrun export` wrote to `folder`, in eval mode and float32."""
    folder = Path(folder)
    return _build(_read_export_config(folder), folder / WEIGHTS, torch.device(device))


def load_model(path: str | Path, device: str | torch.device = "auto") -> tuple[Config, GPT]:
    """(config, model in eval mode on `device`) from a run directory (its newest checkpoint), a
    checkpoint directory or an export folder. `device` "auto" picks CUDA if present. Weights are
    float32; activations run in the dtype training used on that device (bf16 on CUDA)."""
    path = Path(path)
    device = pick_device(device) if device in ("auto", "cpu", "cuda") else torch.device(device)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        cfg, weights = _read_export_config(path), path / WEIGHTS
    else:
        found = [path] if (path / "state.json").is_file() else checkpoint.list_checkpoints(path)
        if not found:
            raise UsageError(f"{path}: no checkpoint there (expected a run directory with "
                             f"checkpoints/{checkpoint.PREFIX}*, a checkpoint directory or a folder written by "
                             "`speedrun export`)")
        cfg, weights = checkpoint.read_config(found[-1]), found[-1] / WEIGHTS
    model = _build(cfg, weights, device)
    model.activation_dtype = activation_dtype(cfg.model, device)
    return cfg, model


def final_window(cfg: Config) -> int:
    """The attention window the run ended with, which is the one its weights are best at."""
    return window_tokens(cfg.train.steps, cfg.train.steps, cfg.model)


def export(path: str | Path, out: str | Path) -> Path:
    cfg, model = load_model(path, "cpu")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    (out / "README.md").write_text(README.format(name=out.name, description=cfg.description or "custom config",
                                                 window=final_window(cfg)))
    return out


def register(sub) -> None:
    p = sub.add_parser("export", help="write a trained model as safetensors + config.json",
                       description="Write the newest checkpoint of a run (or a given checkpoint) as a folder holding "
                                   "model.safetensors (float32), config.json (the resolved config) and a README. "
                                   "Load it with speedrun.export.from_pretrained(DIR).")
    p.add_argument("path", metavar="RUN_DIR|CKPT", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    out = export(args.path, args.out)
    for name in (WEIGHTS, CONFIG, "README.md"):
        print(out / name)
    return 0
