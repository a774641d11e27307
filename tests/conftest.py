import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedrun.prepare import trust_cpu_vector_isa

# A tiny-preset run shrunk so that a 20-step run takes seconds on 2 cores: the model is the tiny
# preset's, only the batch and validation set are smaller.
SMALL_RUN = ["--set", "data.seq_len=128", "--set", "data.micro_batch_seqs=2", "--set", "data.batch_tokens=512",
             "--set", "data.val_tokens=2048", "--set", "data.val_seq_len=256", "--set", "model.window_max=256",
             "--no-compile"]
# tiny's 2026 layout at 4 blocks (half the compile time of its 6), as config overrides
TINY_4_BLOCKS = ["model.n_layer=4", "model.long_short_pattern=SSSL", "model.value_embed_layers=[1, 3]",
                 "model.skip_connections=[[0, 2]]", "model.attn_input_layer=1", "model.gate_split_layer=2",
                 "model.paired_head_layers=[0, 2]", "model.xsa_layers=[1]", "model.attn_gate_layers=[3]",
                 "model.composable_layers=[3]"]


def prepared(model, device="cpu", mode="train", sequences_per_loss=1):
    """`model` set up by speedrun.prepare for `device` and `mode`, eager (the model, not a compiled wrapper)."""
    from speedrun.config import Config, TrainConfig
    from speedrun.prepare import prepare

    prepare(model, Config(model=model.cfg, train=TrainConfig(compile=False)), torch.device(device), mode,
            sequences_per_loss)
    return model


class Compiles:
    """The torch.compile compilations inside the block (`frames`), each as "function (file:line):
    why", where why is a recompile's guard failure or "first compile": a test that expects none
    shows in its failure what compiled and why. Clears Dynamo's bounded record of compilations."""

    def __enter__(self):
        torch._dynamo.utils.clear_compilation_metrics()
        self.frames: list[str] = []
        return self

    def __exit__(self, *exc):
        self.frames = [f"{m.co_name} ({m.co_filename}:{m.co_firstlineno}): "
                       f"{getattr(m, 'recompile_reason', None) or 'first compile'}"
                       for m in torch._dynamo.utils.get_compilation_metrics()]
        return False


def speedrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "speedrun", *args]


# One thread per process: on a 2-core machine two OpenMP threads stall badly whenever another
# process holds a core, and the tests compare numbers, not speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The tests' own torch.compile calls (outside speedrun.prepare) set inductor up as a CPU run does:
# the vector ISA from the CPU's flags, not test builds in every worker (seconds each)
trust_cpu_vector_isa()


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(speedrun_cmd(*args), capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"speedrun {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def run_cli_here(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`speedrun ARGS` through its real entry point (`cli.main`: argument errors, one-line errors,
    exit codes) in this process, for the quick commands (compare, plot, record, schedule): a process
    of their own spends about 2.5 s of CPU importing torch."""
    from speedrun import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(map(str, args)))
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) else 1
    r = subprocess.CompletedProcess(["speedrun", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"speedrun {' '.join(map(str, args))} exited {code}:\n{r.stdout}\n{r.stderr}")
    return r


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict:
    """step -> (train_loss or val_loss) for every record."""
    return {(r["step"], "val" if "val_loss" in r else "train"): r.get("val_loss", r.get("train_loss"))
            for r in read_metrics(run_dir)}


def pytest_configure(config):
    # pytest-xdist (3.8 and later) hands out a loadfile run's files by their number of tests, most
    # first, unless told otherwise: the order below would be ignored, and the staged resume, one
    # test of two minutes, started near the end and ran on alone (9:01 of wall time for 8:12 of work).
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    # Files holding a slow test run first: under `pytest -n auto --dist loadfile`, workers take whole
    # files in this order, so a minute-long file started last would run on alone at the end.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With SPEEDRUN_FAILURES_AT_ONCE=1, a failure's traceback goes to stderr as the test fails, not
    in pytest's closing summary: benchmarks/gpu_check.sh sets it, because its time limit can kill
    pytest before the summary and a lent GPU's minutes are too few to run the tests again."""
    if report.failed and os.environ.get("SPEEDRUN_FAILURES_AT_ONCE") == "1":
        print(f"\n{report.nodeid} FAILED ({report.when}):\n{report.longreprtext}\n", file=sys.stderr, flush=True)
