"""Same seed, same losses, with the defaults users run: compiled, torch's default thread count."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import SMALL_RUN, losses


@pytest.mark.slow
def test_default_compiled_runs_repeat_and_resume_exactly(tmp_path):
    """As users run it: compiled, with torch's default thread count. Two runs of one seed give the
    same losses step for step, and a run resumed from its step-4 checkpoint ends as the unbroken
    one. (Inductor's CPU scatter-adds made such runs drift by ~1e-4 before the trainer turned on
    deterministic algorithms on CPU.)"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    small = [a for a in SMALL_RUN if a != "--no-compile"]
    common = ["--preset", "tiny", "--steps", "8", "--val-every", "4", "--seed", "3", "--compile", *small]

    def train(*args):
        r = subprocess.run([sys.executable, "-m", "speedrun", "train", *args], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr

    first, second = tmp_path / "first", tmp_path / "second"
    train(*common, "--out", str(first))
    train(*common, "--out", str(second), "--save-every", "4")
    assert losses(second) == losses(first)
    shutil.rmtree(second / "checkpoints" / "step_000008")
    train("--resume", "auto", "--out", str(second), *common)
    assert losses(second) == losses(first)
    assert "compile: torch.compile" in (second / "log.txt").read_text()
