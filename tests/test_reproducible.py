"""Same seed, same losses, with the defaults users run: compiled, torch's default thread count."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_RUN, losses

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.slow
def test_default_compiled_runs_repeat_and_resume_exactly_after_sigkill(tmp_path):
    """As users run it: compiled, with torch's default thread count. Two runs of one seed give the
    same losses step for step, and a run SIGKILLed while writing its final checkpoint, resumed
    with --resume auto from its step-4 one, ends exactly as the unbroken run. (Inductor's CPU
    scatter-adds made such runs drift by ~1e-4 before the trainer turned on deterministic
    algorithms on CPU.)"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    small = [a for a in SMALL_RUN if a != "--no-compile"]
    common = ["train", "--preset", "tiny-2025", "--steps", "8", "--val-every", "4", "--seed", "3", "--compile", *small]
    first, second = tmp_path / "first", tmp_path / "second"

    def speedrun(*args, script=None, extra_env=None):
        entry = [str(SCRIPTS / script)] if script else ["-m", "speedrun"]
        return subprocess.run([sys.executable, *entry, *args], env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=600)

    assert speedrun(*common, "--out", str(first)).returncode == 0
    killed = speedrun(*common, "--out", str(second), "--save-every", "4", script="kill_during_save.py",
                      extra_env={"SPEEDRUN_TEST_KILL_ON_SAVE": "2"})  # the second save is the final one
    assert killed.returncode == -9
    assert losses(second) == losses(first)  # every step and validation was written before the kill
    assert sorted(p.name for p in (second / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step_000004"]
    resumed = speedrun("train", "--resume", "auto", "--out", str(second), *common[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert losses(second) == losses(first)
    log = (second / "log.txt").read_text()
    assert "resumed from" in log and "compile: torch.compile" in log

