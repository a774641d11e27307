"""End-to-end runs of `speedrun train` on CPU: outputs, resume, failure paths."""

import json
import tomllib

import pytest

from conftest import SMALL_RUN, losses, read_metrics, run_cli


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    r = run_cli("train", "--preset", "tiny", "--steps", "12", "--val-every", "6", "--out", str(out), *SMALL_RUN)
    return out, r


def test_run_writes_config_log_metrics_summary(short_run):
    out, r = short_run
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["train"]["steps"] == 12 and cfg["data"]["seq_len"] == 128
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("python ") and "torch" in log[0]
    assert any(line.startswith("step:12/12 val_loss:") for line in log)
    assert any(line.startswith("step:3/12 train_time:") and line.endswith("ms") for line in log)
    records = read_metrics(out)
    train = [m for m in records if "train_loss" in m]
    val = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 13))
    assert [m["step"] for m in val] == [0, 6, 12]
    for m in train:
        assert {"step", "tokens", "train_time_ms", "train_loss", "lr", "tokens_per_s"} <= set(m)
        assert m["tokens"] == m["step"] * 512
    assert all(a["train_time_ms"] <= b["train_time_ms"] for a, b in zip(records, records[1:]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] == val[-1]["val_loss"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert "final val_loss:" in r.stdout
    assert (out / "checkpoints" / "step_000012" / "model.safetensors").is_file()


def test_resume_continues_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    common = ["--preset", "tiny", "--steps", "20", "--val-every", "5", *SMALL_RUN]
    run_cli("train", *common, "--out", str(straight))
    run_cli("train", *common, "--out", str(broken), "--save-every", "10")
    # Throw away the end of the second run and continue from its step-10 checkpoint.
    import shutil
    shutil.rmtree(broken / "checkpoints" / "step_000020")
    run_cli("train", "--resume", "auto", "--out", str(broken))
    assert losses(broken) == losses(straight)
    assert [m["step"] for m in read_metrics(broken)] == [m["step"] for m in read_metrics(straight)]


def test_nan_loss_stops_with_the_step_and_nonzero_exit(tmp_path):
    r = run_cli("train", "--preset", "baseline-tiny", "--steps", "6", "--out", str(tmp_path / "nan"), *SMALL_RUN,
                "--set", "optim.lr_adam=1e30", "--set", "optim.grad_clip=0.0", "--set", "optim.warmup_steps=0",
                check=False)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("speedrun train: error: training loss became") and "at step" in line


def test_unknown_data_dir_is_one_line(tmp_path):
    r = run_cli("train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
                check=False)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "nowhere" in r.stderr
