"""`speedrun export`: a trained model as a self-contained folder (safetensors weights, the resolved
config as JSON, a README) that `speedrun.loading` reads back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_model

from speedrun.checkpoint import replace_atomically
from speedrun.config import to_dict
from speedrun.errors import UsageError
from speedrun.loading import CONFIG, WEIGHTS, final_window, load_model
from speedrun.rundir import check_folder, make_folder
# The READMEs of exported folders tell users to import from_pretrained from here: keep that working.
from speedrun.loading import from_pretrained

__all__ = ["export", "from_pretrained", "register"]

README_FILE = "README.md"
FILES = (WEIGHTS, CONFIG, README_FILE)

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

The model attends within the windows it was last validated with; pass
`{window}` to `model(...)` to match. Or, from the command line:
`speedrun sample {name} --prompt "..."`, `speedrun eval hellaswag {name}`.
"""


def export(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model of `path` (a run, a checkpoint or an export) into the folder `out`. An earlier
    export there is replaced only with `overwrite`; each file is written beside its final name and
    renamed over it, so an interrupted export leaves the earlier files whole."""
    out = check_folder(out)
    held = [name for name in FILES if (out / name).exists()]
    if held and not overwrite:
        raise UsageError(f"--out {out} already holds an export ({', '.join(held)}); replace it with --overwrite, "
                         f"or choose another --out")
    cfg, model = load_model(path, "cpu")
    make_folder(out)
    readme = README.format(name=out.name, description=cfg.description or "custom config",
                           window=", ".join(f"{k}={v}" for k, v in final_window(cfg).kwargs().items() if v is not None))
    replace_atomically(out / WEIGHTS, lambda tmp: save_model(model, str(tmp)))
    replace_atomically(out / CONFIG, lambda tmp: tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n"))
    replace_atomically(out / README_FILE, lambda tmp: tmp.write_text(readme))
    return out


def register(sub) -> None:
    p = sub.add_parser("export", help="write a trained model as safetensors + config.json",
                       description="Write the newest checkpoint of a run (or a given checkpoint) as a folder holding "
                                   "model.safetensors (float32), config.json (the resolved config) and a README. "
                                   "Load it with speedrun.export.from_pretrained(DIR).")
    p.add_argument("path", metavar="RUN_DIR|CKPT", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    out = export(args.path, args.out, args.overwrite)
    for name in FILES:
        print(out / name)
    return 0
