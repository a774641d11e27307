"""The run directory: which one a run writes to, and the rule that keeps results from mixing; and
the check every command makes of a folder it will write (check_folder, make_folder).

A directory that already holds a run's results (config, log, metrics, summary, checkpoints) is
never written into by a new run: `--resume` continues that run, `--overwrite` deletes its results
first, and anything else is refused before any work starts. Default directories are
`runs/<timestamp>`, created atomically, with a numbered suffix when another run took the name
in the same second.

A run also claims its directory for as long as it runs (an advisory lock on the folder itself,
flock, which the system drops when the process ends, however it ends): a second `speedrun train`
into it, whether resuming or overwriting, is refused rather than interleaving its files with the
first's. Where the system has no flock (Windows) or the file system refuses one, runs go unclaimed.
"""

from __future__ import annotations

import errno
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


def check_folder(folder: str | Path, option: str = "--out") -> Path:
    """Refuse, in one line naming `option`, an output folder with a file in its place or above it,
    before any work; nothing is created."""
    folder = Path(folder)
    for above in [folder, *folder.parents]:
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"{option} {folder}: " + ("exists and is not a folder" if above == folder
                                                           else f"{above} is a file, not a folder"))
            break
    return folder


def make_folder(folder: str | Path, option: str = "--out") -> Path:
    """Any command's output folder, made with its parents, or one line naming `option` and why not."""
    folder = check_folder(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot create it ({e.strerror or e})") from None
    return folder


def _check_writable(folder: Path) -> None:
    make_folder(folder)
    try:
        probe = folder / ".speedrun-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {folder}: cannot write there ({e.strerror or e})") from None


# this process's claims (open descriptors of the claimed folders, each holding its flock)
_claims: dict[Path, int] = {}


def claim(folder: Path) -> None:
    """Hold `folder` for this process until `release` or the process's end (module docstring); a
    UsageError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    key = folder.resolve()
    if key in _claims:
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:  # not a folder (yet): what uses it says so
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(f"{folder}: another speedrun train is running in this run directory; wait for it "
                             "to end or choose another --out") from None
        return  # a file system without flock: unclaimed, as before claims existed
    _claims[key] = fd


def release() -> None:
    """Give up every folder this process claimed."""
    while _claims:
        os.close(_claims.popitem()[1])


def prepare(out: str | None, resume: str | None, overwrite: bool) -> Path:
    """The run directory for `speedrun train`, checked and claimed (module docstring) before any
    model is built."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite deletes one; give one of them")
    resumed_run = None
    if resume and resume != "auto":
        target = Path(resume)
        # a checkpoint (RUN/checkpoints/step_N) resumes into its own run directory
        resumed_run = target.parent.parent if (target / "state.json").is_file() else target
    if out is None:
        folder = resumed_run if resumed_run is not None else new_default()
        claim(folder)
        return folder
    folder = check_folder(out)
    held = results_in(folder) if folder.is_dir() else []
    if held and resumed_run is not None and folder.resolve() != resumed_run.resolve():
        raise UsageError(f"--out {folder} already holds another run ({', '.join(held)}); resume {resume} into its "
                         "own directory (leave out --out) or into an empty one")
    if held and not resume and not overwrite:
        raise UsageError(f"--out {folder} already holds a run ({', '.join(held)}); continue it with --resume "
                         f"{folder}, delete its results with --overwrite, or choose another --out")
    _check_writable(folder)
    claim(folder)
    if overwrite:
        for name in held:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else os.remove(path)
    return folder
