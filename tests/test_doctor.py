"""`speedrun doctor`: passes on this CPU machine with the default preset, one FAIL line per problem
and no traceback otherwise, exit 2 for a bad preset, and the process-group check under torchrun."""

import numpy as np
import pytest

from conftest import run_cli
from speedrun import doctor
from speedrun.config import load_config
from speedrun.data import shards
from speedrun.data.tokenizer import EOT


def lines(result, status: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(f"{status:<6}")]


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def write_shards(folder, train: int, val: int) -> None:
    for kind, n in (("train", train), ("val", val)):
        tokens = np.arange(n, dtype=np.uint16) % 1000
        tokens[::50] = EOT
        shards.write_shard(folder / f"x_{kind}_000000.bin", tokens)


def test_doctor_passes_on_this_machine_with_the_default_preset():
    r = run_cli("doctor", timeout=240)
    assert_no_traceback(r)
    ok = "\n".join(lines(r, "ok"))
    assert not lines(r, "FAIL"), r.stdout
    for name in ["versions: python", "device: cpu", "dtype:", "attention self-test: compiled FlexAttention",
                 "attention self-test: SDPA", "batch from step 0:", "data: train", "data: val", "compile:"]:
        assert name in ok, (name, r.stdout)
    info = "\n".join(lines(r, "info"))
    assert "single process" in info and "attention: SDPA" in info and "fp8: no FP8" in info
    assert r.stdout.rstrip().endswith("doctor: all checks passed")


def test_missing_data_folder_fails_in_one_line(tmp_path):
    missing = tmp_path / "nonexistent"
    r = run_cli("doctor", "--data", str(missing), check=False, timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    assert_no_traceback(r)
    failed = lines(r, "FAIL")
    assert len(failed) == 1 and "data:" in failed[0] and str(missing) in failed[0], r.stdout
    assert "ok    compile:" in r.stdout  # the checks after the failed one still run


def test_too_few_tokens_gives_one_fail_line_per_problem(tmp_path):
    """In process: the data check alone (the CLI's exit status and the checks after a failed one are
    test_missing_data_folder_fails_in_one_line's)."""
    write_shards(tmp_path, train=5000, val=3000)  # tiny-2025 needs 70 × 4,096 train and 16,385 val tokens
    cfg = load_config("tiny-2025", None, [f'data.dir="{tmp_path}"'])
    out = run_in_process(cfg, [("data", doctor.check_data, False)])
    failed = [text for status, text in out if status == "FAIL"]
    assert len(failed) == 2, out
    assert "train holds 5,000 tokens" in failed[0] and "passes over the data" in failed[0]
    assert "val holds 3,000 tokens" in failed[1] and "16,385" in failed[1]


def test_bad_preset_and_key_exit_2():
    r = run_cli("doctor", "--preset", "no-such-preset", check=False, timeout=60)
    assert r.returncode == 2 and "unknown preset 'no-such-preset'" in r.stderr
    r = run_cli("doctor", "--set", "model.no_such_key=1", check=False, timeout=60)
    assert r.returncode == 2 and "model.no_such_key" in r.stderr
    assert_no_traceback(r)


def run_in_process(cfg, checks) -> list[tuple[str, str]]:
    ctx, out = doctor.Context(cfg, "test"), []
    doctor.run_checks(ctx, lambda status, text: out.append((status, text)), checks)
    return out


def test_damaged_headers_and_missing_kinds_are_named(tmp_path):
    write_shards(tmp_path, train=400_000, val=20_000)
    (tmp_path / "x_train_000001.bin").write_bytes(b"\0" * 2000)  # a header with the wrong magic number
    cfg = load_config("tiny-2025", None, [f'data.dir="{tmp_path}"'])
    out = run_in_process(cfg, [("data", doctor.check_data, False)])
    failed = [text for status, text in out if status == "FAIL"]
    assert len(failed) == 1 and "x_train_000001.bin" in failed[0] and "not a token shard" in failed[0], out
    assert ("ok", "data: val holds 20,000 tokens ≥ 16,385 that data.val_tokens = 16,384 needs") in out

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.data.dir = str(empty)
    failed = [text for status, text in run_in_process(cfg, [("data", doctor.check_data, False)]) if status == "FAIL"]
    assert len(failed) == 2 and "no train shards" in failed[0] and "no val shards" in failed[1], failed


def test_a_check_that_raises_is_one_fail_line_and_the_rest_still_run():
    def broken(ctx):
        yield "info", "broken: started"
        raise RuntimeError("something went wrong\nsecond line")

    out = run_in_process(load_config("tiny-2025"), [("broken", broken, False), ("batch", doctor.check_batch, False)])
    assert out[:2] == [("info", "broken: started"), ("FAIL", "broken: RuntimeError: something went wrong")]
    assert out[2][0] == "ok" and out[2][1].startswith("batch:")


@pytest.mark.slow
def test_process_group_under_torchrun_with_two_cpu_processes():
    from test_distributed import torchrun

    # tiny-2025: tiny's first stages train one sequence per step, which two processes cannot share
    r = torchrun("doctor", "--preset", "tiny-2025", "--device", "cpu", nproc=2)
    assert_no_traceback(r)
    assert not lines(r, "FAIL"), r.stdout
    assert r.stdout.count("ok    versions:") == 1  # only rank 0 prints
    assert "ok    distributed: backend gloo, world size 2" in r.stdout and "on every rank" in r.stdout
    assert "1 grad accumulation step(s)" in r.stdout
