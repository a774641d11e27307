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
    common = ["train", "--preset", "tiny", "--steps", "8", "--val-every", "4", "--seed", "3", "--compile", *small]
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


@pytest.mark.slow
def test_staged_2026_run_resumes_exactly_across_a_stage(tmp_path):
    """tiny-2026, compiled, default threads, shrunk as SMALL_RUN shrinks tiny: a run killed while
    saving at step 10 resumes from its step-5 checkpoint (an even number of Adam steps behind:
    step 4's gradient is still waiting in RecordAdam's state) through the stage change at step 8,
    and ends with the unbroken run's losses, bit for bit."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    common = ["train", "--preset", "tiny-2026", "--steps", "12", "--val-every", "6", "--seed", "3",
              "--set", "stages.seq_len=[128, 128, 128, 128]", "--set", "stages.batch_tokens=[256, 512, 768, 768]",
              "--set", "stages.max_doc_len=[64, 128, 128, 128]", "--set", "data.val_tokens=2048",
              "--set", "data.val_seq_len=256"]
    first, second = tmp_path / "first", tmp_path / "second"

    def speedrun(*args, script=None, extra_env=None):
        entry = [str(SCRIPTS / script)] if script else ["-m", "speedrun"]
        return subprocess.run([sys.executable, *entry, *args], env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=600)

    assert speedrun(*common, "--out", str(first)).returncode == 0
    killed = speedrun(*common, "--out", str(second), "--save-every", "5", script="kill_during_save.py",
                      extra_env={"SPEEDRUN_TEST_KILL_ON_SAVE": "2"})
    assert killed.returncode == -9
    resumed = speedrun("train", "--resume", "auto", "--out", str(second), *common[1:], "--save-every", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in (second / "log.txt").read_text()
    assert losses(second) == losses(first)
