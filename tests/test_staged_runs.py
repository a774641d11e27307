"""Whole runs of a staged preset (tiny, shrunk): the batch-size schedule gives the same losses
at any world size, and a compiled run resumes exactly across a stage change. In a file of their own
so that pytest-xdist (--dist loadfile) can run them beside the other multi-process files."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_4_BLOCKS, losses, read_metrics
from test_distributed import SCRIPTS, assert_same_losses, torchrun

pytestmark = pytest.mark.slow


# tiny shrunk as SMALL_RUN shrinks tiny-2025: stages of 2, 4 and 6 sequences of 128 tokens per step, 4 blocks,
# and loss weights that ramp in every stage but keep one length, so the whole run is one compiled
# graph (each stage's own graph would triple the compile time, as tests/test_stages.py's warm-up
# test covers instead)
RUN = ["--preset", "tiny", "--steps", "12", "--val-every", "6",
       "--set", "stages.seq_len=[128, 128, 128, 128]", "--set", "stages.batch_tokens=[256, 512, 768, 768]",
       "--set", "stages.max_doc_len=[64, 128, 128, 128]", "--set", "data.val_tokens=2048",
       "--set", "data.val_seq_len=256",
       "--set", "stages.mtp_weights_start=[[1.0, 0.5], [1.0, 0.5], [1.0, 0.2], [1.0, 0.1]]",
       "--set", "stages.mtp_weights_end=[[1.0, 0.5], [1.0, 0.2], [1.0, 0.1], [1.0, 0.1]]",
       "--set", "stages.prefix_weight_start=[0.25, 0.25, 0.1, 0.05]",
       "--set", "stages.prefix_weight_end=[0.25, 0.1, 0.05, 0.05]",
       *(arg for key in TINY_4_BLOCKS for arg in ("--set", key))]
STAGED = [*RUN, "--device", "cpu", "--no-compile"]


def speedrun(*args: str, script: str | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`speedrun ARGS` (or a script from tests/scripts) as users run it: torch's default thread count."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    entry = [str(SCRIPTS / script)] if script else ["-m", "speedrun"]
    return subprocess.run([sys.executable, *entry, *args], env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=600)


def test_two_processes_match_one_process_through_the_batch_size_schedule(tmp_path):
    """The 2026 stages: 2 → 4 → 6 sequences per step over BOS-aligned documents, NorMuon sharded
    over the ranks, Adam on odd steps, the 2026 model with its head untied after step 9. One process
    accumulates 2, 4, 6 micro-steps; two, 1, 2, 3."""
    one, two = tmp_path / "w1", tmp_path / "w2"
    torchrun("train", *STAGED, "--out", str(one), nproc=1)
    torchrun("train", *STAGED, "--out", str(two), nproc=2)
    assert "grad_accum: 2" in (one / "log.txt").read_text() and "grad_accum: 1" in (two / "log.txt").read_text()
    assert_same_losses(one, two)


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
