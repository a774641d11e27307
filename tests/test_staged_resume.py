"""A compiled run of a staged preset (tiny, shrunk as tests/test_staged_runs.py's RUN) resumes
exactly across a stage change, loads its graphs from a warm cache to the same losses, and survives
a SIGKILL while saving. A file of its own so that pytest-xdist (--dist loadfile) can run it beside
the other long runs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import losses, read_metrics
from test_distributed import SCRIPTS
from test_staged_runs import RUN

pytestmark = pytest.mark.slow


def speedrun(*args: str, script: str | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`speedrun ARGS` (or a script from tests/scripts) as users run it: torch's default thread count."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    entry = [str(SCRIPTS / script)] if script else ["-m", "speedrun"]
    return subprocess.run([sys.executable, *entry, *args], env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=600)


def test_staged_2026_run_resumes_exactly_across_a_stage(tmp_path):
    """tiny (the default preset), compiled, default threads, shrunk as SMALL_RUN shrinks tiny-2025,
    over one inductor cache that is empty at first: a second run of the seed, loading every graph
    the first compiled, gives the same losses to the bit (RecordAdam's update compiled with dynamic
    shapes once did not: the cached graph rounded differently). That run is killed while saving at
    step 10: the half-written checkpoint exists only under a temporary name, and the run resumes
    from its step-5 checkpoint (an even number of Adam steps behind: step 4's gradient is still
    waiting in RecordAdam's state) through the stage change at step 8 (YaRN's update with it) and
    the head's untying after step 9, and ends with the unbroken run's losses, bit for bit."""
    common = ["train", *RUN, "--seed", "3"]
    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    assert speedrun(*common, "--out", str(first), extra_env=env).returncode == 0
    assert any(cache.rglob("*.py")), "the first run left no compiled kernels in its cache"
    killed = speedrun(*common, "--out", str(second), "--save-every", "5", script="kill_during_save.py",
                      extra_env={**env, "SPEEDRUN_TEST_KILL_ON_SAVE": "2"})
    assert killed.returncode == -9
    # same seed, same losses, warm cache or cold: every step the killed run logged (through step 10) is the first run's
    before_kill = losses(second)
    assert max(step for step, _ in before_kill) == 10
    assert before_kill == {key: loss for key, loss in losses(first).items() if key in before_kill}
    # the save the kill interrupted left no checkpoint behind, only the one before it, whole
    checkpoints = second / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step_000005"]
    assert sorted(p.name for p in (checkpoints / "step_000005").iterdir()) == [
        "config.toml", "model.safetensors", "rank_00000.pt", "state.json"]
    resumed = speedrun("train", "--resume", "auto", "--out", str(second), *common[1:], "--save-every", "5",
                       extra_env=env)
    assert resumed.returncode == 0, resumed.stderr
    log = (second / "log.txt").read_text()
    assert "resumed from" in log and "compile: torch.compile" in log
    assert losses(second) == losses(first)
    assert [m["step"] for m in read_metrics(second)] == [m["step"] for m in read_metrics(first)]
    assert not list(checkpoints.glob(".tmp-*"))
    # the warm-up compiled every shape, so nothing compiled on the clock, across stages and on resume
    for run in (first, second):
        assert json.loads((run / "summary.json").read_text())["compiles_on_clock"] == 0, run
