"""The run directory: which one a run writes to, and the rule that keeps results from mixing.

A directory that already holds a run's results (config, log, metrics, summary, checkpoints) is
never written into by a new run: `--resume` continues that run, `--overwrite` deletes its results
first, and anything else is refused before any work starts. Default directories are
`runs/<timestamp>`, created atomically, with a numbered suffix when another run took the name
in the same second.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from speedrun.errors import UsageError

# What `speedrun train` writes into a run directory; anything else there is left alone.
RESULTS = ("config.toml", "log.txt", "metrics.jsonl", "summary.json", "loss.png", "checkpoints", "tensorboard",
           "wandb")


def results_in(folder: Path) -> list[str]:
    return [name for name in RESULTS if (folder / name).exists()]


def new_default(root: Path = Path("runs")) -> Path:
    """A fresh runs/<timestamp>[-N] directory, made here so two runs never share it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{root}: could not create a new run directory for {stamp}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".speedrun-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {folder}: cannot write there ({e.strerror or e})") from None


def prepare(out: str | None, resume: str | None, overwrite: bool) -> Path:
    """The run directory for `speedrun train`, checked before any model is built."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite deletes one; give one of them")
    resumed_run = None
    if resume and resume != "auto":
        target = Path(resume)
        # a checkpoint (RUN/checkpoints/step_N) resumes into its own run directory
        resumed_run = target.parent.parent if (target / "state.json").is_file() else target
    if out is None:
        return resumed_run if resumed_run is not None else new_default()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: exists and is not a folder")
    held = results_in(folder) if folder.is_dir() else []
    if held and resumed_run is not None and folder.resolve() != resumed_run.resolve():
        raise UsageError(f"--out {folder} already holds another run ({', '.join(held)}); resume {resume} into its "
                         "own directory (leave out --out) or into an empty one")
    if held and not resume:
        if not overwrite:
            raise UsageError(f"--out {folder} already holds a run ({', '.join(held)}); continue it with --resume "
                             f"{folder}, delete its results with --overwrite, or choose another --out")
        for name in held:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else os.remove(path)
    _check_writable(folder)
    return folder
