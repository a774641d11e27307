"""Checkpoints that resume a run exactly and can be written at any moment without risk.

Layout of `RUN_DIR/checkpoints/step_NNNNNN/`:
  model.safetensors     weights (rank 0; every rank holds the same weights)
  rank_RRRRR.pt         per rank: optimizer states and RNG states, tensors only
  state.json            step, clock, loader position, world size
  config.toml           the fully resolved config
A checkpoint is built in a hidden `.tmp-*` directory and renamed into place when complete, so a
kill at any moment leaves only whole checkpoints under final names. Nothing is loaded with pickle
code execution: safetensors for weights, `torch.load(weights_only=True)` for the rest.

Sharded optimizer state (Muon's momentum lives on the rank that orthogonalises that matrix) is
saved per rank; on load every rank reads every rank's file and keeps what it owns, so a run can
resume on a different number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from speedrun.config import Config, from_dict, to_toml
from speedrun.data.loader import state_problem
from speedrun.distributed import Runtime, barrier
from speedrun.errors import DataError, UsageError, first_line

PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary file beside it, renamed over `path`
    once it is on disk: a reader finds the old file or the new one, whole, and a write that fails
    leaves the old file and no temporary one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: dict) -> None:
    """Atomically replace `path` with `obj` as JSON."""
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))  # by step: step_1000000 after step_999999


def newest(path: str | Path) -> Path | None:
    """`path` itself if it is a checkpoint directory, else the newest checkpoint of the run directory
    `path`; None if there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest checkpoint under run_dir, or None for a fresh start. Otherwise a checkpoint
    directory, or a run directory whose newest checkpoint is used."""
    found = newest(run_dir if resume == "auto" else resume)
    if found is None and resume != "auto":
        raise UsageError(f"--resume {resume}: no checkpoint there (expected a run directory with checkpoints/{PREFIX}* "
                         f"or a checkpoint directory with state.json)")
    return found


def read_config(ckpt: Path) -> Config:
    path = ckpt / "config.toml"
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the checkpoint cannot be resumed or loaded without its config") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not TOML, a 5000-digit integer
        raise DataError(f"{path}: damaged ({first_line(e)})") from None
    return from_dict(table, str(path))


def _owned_state(opt: torch.optim.Optimizer) -> dict:
    state = opt.state_dict()
    owns = getattr(opt, "owns", None)
    if owns is not None:  # sharded optimizer: keep only the entries this rank is responsible for
        params = [p for g in opt.param_groups for p in g["params"]]
        state["state"] = {i: s for i, s in state["state"].items() if owns(params[i])}
    return state


def save(run_dir: Path, model: torch.nn.Module, optimizers: list, state: dict, cfg: Config, rt: Runtime,
         keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    name = f"{PREFIX}{state['step']:06d}"
    tmp = root / f".tmp-{name}"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rank_file = tmp / f"rank_{rt.rank:05d}.pt"
    payload = {"optimizers": [_owned_state(o) for o in optimizers], "rng_cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        payload["rng_cuda"] = torch.cuda.get_rng_state(rt.device)
    torch.save(payload, rank_file)
    _fsync_file(rank_file)
    if rt.is_main:
        save_model(model, str(tmp / "model.safetensors"))
        _fsync_file(tmp / "model.safetensors")
        (tmp / "config.toml").write_text(to_toml(cfg))
        _fsync_file(tmp / "config.toml")
        write_json(tmp / "state.json", {**state, "world_size": rt.world_size})
    barrier()
    final = root / name
    if rt.is_main:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def read_state(ckpt: Path) -> dict:
    """state.json: step, clock, loader position, world size."""
    path = ckpt / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: not a readable checkpoint state ({first_line(e)})") from None
    if not (isinstance(state, dict) and type(state.get("step")) is int and type(state.get("world_size")) is int
            and state["step"] >= 0 and state["world_size"] >= 1):
        raise DataError(f"{path}: not a readable checkpoint state (expected a JSON object with an integer step >= 0 "
                        "and world_size >= 1)")
    return state


def load_weights(model: torch.nn.Module, path: Path, device: str = "cpu") -> None:
    """`path`'s weights into `model`, which must have every key and shape the file has; else one
    DataError line that names what differs (torch's message puts that on the lines after its first)."""
    try:
        load_model(model, str(path), strict=True, device=device)
    except Exception as e:  # safetensors raises several types; all mean the same thing here
        header, *rest = str(e).strip().splitlines() or [""]
        detail = "; ".join(line.strip() for line in rest if line.strip()) if header.startswith("Error(s) in loading") else ""
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise DataError(f"{path}: cannot load weights ({detail or first_line(e)})") from None


def load(ckpt: Path, model: torch.nn.Module, optimizers: list, rt: Runtime) -> dict:
    """Restore weights, optimizer and RNG states in place; return the trainer state (step, clock,
    loader position)."""
    state = read_state(ckpt)
    clock, problem = state.get("train_time_ms"), state_problem(state.get("loader"))
    if isinstance(clock, bool) or not isinstance(clock, (int, float)) or problem:
        raise DataError(f"{ckpt / 'state.json'}: not a readable checkpoint state "
                        f"({problem or 'train_time_ms is not a number'})")
    load_weights(model, ckpt / "model.safetensors")
    rank_files = sorted(ckpt.glob("rank_*.pt"))
    if len(rank_files) != state["world_size"]:
        raise DataError(f"{ckpt}: expected {state['world_size']} rank files, found {len(rank_files)}")
    payloads = [_load_tensors(f, rt.device) for f in rank_files]
    try:
        _restore(payloads, optimizers, rt)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise DataError(f"{ckpt}: rank_*.pt files do not hold this run's optimizer and RNG states "
                        f"({type(e).__name__}: {first_line(e)})") from None
    return state


def _restore(payloads: list, optimizers: list, rt: Runtime) -> None:
    for i, opt in enumerate(optimizers):
        merged = payloads[0]["optimizers"][i]
        for other in payloads[1:]:
            merged["state"].update(other["optimizers"][i]["state"])
        # The groups' settings come from this run's config (the schedule resets lr and momentum at
        # every step); only the per-parameter state is restored. Older checkpoints grouped the same
        # parameters, in the same order, into other groups (config version 1: one AdamW group for
        # every matrix), and resume exactly this way.
        opt.load_state_dict({"state": merged["state"], "param_groups": opt.state_dict()["param_groups"]})
        owns = getattr(opt, "owns", None)
        if owns is not None:  # drop what another rank now owns, so it is neither used nor saved stale
            for p in [p for g in opt.param_groups for p in g["params"]]:
                if not owns(p):
                    opt.state.pop(p, None)
        for p, entries in opt.state.items():  # load_state_dict checks no shapes; a wrong one fails at the next step
            for name, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"{name} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")
    own = payloads[rt.rank] if rt.rank < len(payloads) else payloads[0]
    torch.set_rng_state(own["rng_cpu"].cpu())
    if rt.device.type == "cuda" and "rng_cuda" in own:
        torch.cuda.set_rng_state(own["rng_cuda"].cpu(), rt.device)


def _load_tensors(path: Path, device: torch.device) -> dict:
    """weights_only refuses any pickle that would construct arbitrary objects or call functions."""
    try:
        _check_records(path)
        with warnings.catch_warnings():  # torch's advice to retry with weights_only=False is not for us
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a loadable checkpoint file; refused to unpickle it ({first_line(e)})") from None


def _check_records(path: Path) -> None:
    """torch.load checks no CRC-32 of the zip it reads: check those of every record but the tensor
    data (a few kB), so that a flipped bit in the pickled structure, say in a state key, is refused
    here rather than failing at the first optimizer step. A flipped bit in tensor data stays a number."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if "/data/" not in info.filename:
                    archive.read(info)  # raises BadZipFile on a CRC mismatch


def truncate_metrics(path: Path, step: int) -> None:
    """Forget what a killed run logged after its last checkpoint, so the resumed run's lines follow on
    exactly. The validation at the checkpoint's step runs again after resuming, so drop it too."""
    if not path.is_file():
        return
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the run's metrics ({first_line(e)})") from None
    lines, kept = text.splitlines(), []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["step"] < step or (record["step"] == step and "val_loss" not in record):
                kept.append(line)
        except (ValueError, KeyError, TypeError, RecursionError):
            if i == len(lines) and not text.endswith("\n"):
                break  # the line the killed run was writing
            raise DataError(f"{path}: line {i} is not a metrics record (a JSON object with a step)") from None
    replace_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
