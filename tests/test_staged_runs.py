"""Whole runs of a staged preset (tiny, shrunk): the batch-size schedule gives the same losses
at any world size. In a file of its own so that pytest-xdist (--dist loadfile) can run it beside the
other multi-process files; the compiled resume across a stage change, as long, is
tests/test_staged_resume.py's, so that the two can run on two workers at once."""

import pytest

from conftest import TINY_4_BLOCKS
from test_distributed import assert_same_losses, torchrun

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


def test_two_processes_match_one_process_through_the_batch_size_schedule(tmp_path):
    """The 2026 stages: 2 → 4 → 6 sequences per step over BOS-aligned documents, NorMuon sharded
    over the ranks, Adam on odd steps, the 2026 model with its head untied after step 9. One process
    accumulates 2, 4, 6 micro-steps; two, 1, 2, 3."""
    one, two = tmp_path / "w1", tmp_path / "w2"
    torchrun("train", *STAGED, "--out", str(one), nproc=1)
    torchrun("train", *STAGED, "--out", str(two), nproc=2)
    assert "grad_accum: 2" in (one / "log.txt").read_text() and "grad_accum: 1" in (two / "log.txt").read_text()
    assert_same_losses(one, two)
