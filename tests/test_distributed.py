"""Several processes under torchrun on CPU (gloo): same losses for any world size, node layout, or
crash-and-restart; checkpoints that refuse to run code. (A SIGKILL during a save:
tests/test_staged_resume.py.)"""

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_RUN, losses, run_cli

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "scripts"
COMMON = ["--preset", "tiny-2025", "--steps", "20", "--val-every", "10", "--device", "cpu", *SMALL_RUN]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int, extra: list[str] = (), env: dict | None = None, script: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "speedrun"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra, *target, *args]
    if "--nnodes=2" not in extra:
        cmd[3:3] = ["--standalone"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def assert_same_losses(a: Path, b: Path, rel: float = 1e-4) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key] == pytest.approx(lb[key], rel=rel), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "run"
    torchrun("train", *COMMON, "--out", str(out), nproc=1)
    return out


def test_two_processes_match_one_process_with_accumulation(one_process, tmp_path):
    assert "grad_accum: 2" in (one_process / "log.txt").read_text()
    out = tmp_path / "w2"
    torchrun("train", *COMMON, "--out", str(out), nproc=2)
    assert "grad_accum: 1" in (out / "log.txt").read_text() and "world_size: 2" in (out / "log.txt").read_text()
    assert_same_losses(one_process, out)


def test_two_nodes_on_one_machine_match_one_node(one_process, tmp_path):
    out, port = tmp_path / "nodes", free_port()
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=speedrun-test"]
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *rdzv, f"--node-rank={rank}",
             "-m", "speedrun", "train", *COMMON, "--out", str(out)] for rank in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert "world_size: 2" in (out / "log.txt").read_text()
    assert_same_losses(one_process, out)


def test_killed_rank_restarts_from_checkpoint_and_finishes_like_an_unbroken_run(one_process, tmp_path):
    out = tmp_path / "restarted"
    torchrun("train", *COMMON, "--out", str(out), "--resume", "auto", "--save-every", "5",
                 nproc=2, extra=["--max-restarts=1"], script=SCRIPTS / "die_once.py",
                 env={"SPEEDRUN_TEST_DIE_AT_STEP": "12", "SPEEDRUN_TEST_DIE_RANK": "1"})
    assert "resumed from" in (out / "log.txt").read_text()
    assert_same_losses(one_process, out)


def test_crafted_checkpoint_does_not_execute_code(one_process, tmp_path):
    import shutil

    run = tmp_path / "evil"
    shutil.copytree(one_process, run)
    ckpt = run / "checkpoints" / "step_000020"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "rank_00000.pt", "wb") as f:
        pickle.dump({"optimizers": Payload()}, f)
    r = run_cli("train", "--resume", str(run), "--out", str(tmp_path / "evil-out"), check=False)
    assert r.returncode != 0
    assert not marker.exists()
    assert "rank_00000.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1

