"""End-to-end runs of `speedrun train` on CPU: outputs, resume, failure paths."""

import json
import subprocess
import time
import tomllib

import pytest

from conftest import SMALL_RUN, losses, read_metrics, run_cli, run_cli_here, speedrun_cmd

pytestmark = pytest.mark.slow  # every test trains in `speedrun train` processes: 5-25 s each on 2 cores

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    r = run_cli("train", "--preset", "tiny-2025", "--steps", "12", "--val-every", "6", "--out", str(out), *SMALL_RUN)
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


def test_resume_continues_exactly(short_run, tmp_path):
    """A run that saved at step 6, continued from there after its end was thrown away, ends with
    the unbroken run's losses, bit for bit, and the same records, none twice."""
    straight, broken = short_run[0], tmp_path / "broken"
    run_cli("train", "--preset", "tiny-2025", "--steps", "12", "--val-every", "6", *SMALL_RUN, "--out", str(broken),
            "--save-every", "6")
    import shutil
    shutil.rmtree(broken / "checkpoints" / "step_000012")
    run_cli("train", "--resume", "auto", "--out", str(broken))
    assert losses(broken) == losses(straight)
    assert [m["step"] for m in read_metrics(broken)] == [m["step"] for m in read_metrics(straight)]


def test_nan_loss_stops_with_the_step_and_nonzero_exit(tmp_path):
    r = run_cli("train", "--preset", "baseline-tiny", "--steps", "6", "--out", str(tmp_path / "nan"), *SMALL_RUN,
                "--set", "optim.lr_hidden=1e30", "--set", "optim.grad_clip=0.0", "--set", "optim.warmup_steps=0",
                check=False)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("speedrun train: error: training loss became") and "at step" in line
    # the run directory says so, and the analysis commands show it as failed
    out = tmp_path / "nan"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("training loss became")
    assert (out / "log.txt").read_text().splitlines()[-1] == f"failed at step {summary['step']}: {summary['error']}"
    compare = run_cli_here("compare", str(out))
    assert f"failed at step {summary['step']}" in compare.stdout
    assert run_cli_here("plot", str(out), "--out", str(tmp_path / "nan.png")).returncode == 0
    record = run_cli_here("record", str(out), str(out), check=False)
    assert record.returncode == 2 and "a record counts finished runs only" in record.stderr


def test_interrupted_run_says_so(tmp_path):
    """Ctrl-C: exit 130, and log.txt and summary.json say the run was interrupted at which step."""
    import signal
    import subprocess
    import time

    from conftest import speedrun_cmd
    out = tmp_path / "run"
    # SIGINT as a terminal delivers it: a suite started in the background (`cmd &` in a script)
    # would otherwise hand the run an ignored SIGINT, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(speedrun_cmd("train", "--preset", "tiny-2025", "--steps", "400", "--out", str(out),
                                         "--set", "data.allow_repeat=true", *SMALL_RUN),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "speedrun train: interrupted"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 <= summary["step"] < 400
    assert (out / "log.txt").read_text().splitlines()[-1].startswith(f"interrupted at step {summary['step']}")


def test_unknown_data_dir_is_one_line(tmp_path):
    r = run_cli("train", "--preset", "tiny-2025", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
                check=False)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "nowhere" in r.stderr


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "run"
    run_cli("train", "--preset", "tiny-2025", "--steps", "4", "--val-every", "2", "--out", str(out), *SMALL_RUN)
    return out


def test_a_run_directory_with_results_is_never_reused(four_step_run, tmp_path):
    """Training again into a run's directory is refused before any work, leaving every file as it
    was; a file, or a folder that cannot be written, as --out is refused the same way."""
    before = _snapshot(four_step_run)
    r = run_cli("train", "--preset", "tiny-2025", "--steps", "4", "--out", str(four_step_run), *SMALL_RUN, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"speedrun train: error: --out {four_step_run} already holds a run (config.toml, log.txt, metrics.jsonl, "
        f"summary.json, loss.png, checkpoints); continue it with --resume {four_step_run}, delete its results with "
        "--overwrite, or choose another --out")
    assert _snapshot(four_step_run) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli("train", "--out", str(afile), check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(f"--out {afile}: exists and is not a folder")
    r = run_cli("train", "--out", str(afile / "sub"), check=False)
    assert r.returncode == 2 and afile.read_text() == "x"
    assert r.stderr.strip().splitlines()[-1].endswith(f"--out {afile / 'sub'}: {afile} is a file, not a folder")


def test_overwrite_removes_the_old_results_first(tmp_path):
    out = tmp_path / "run"
    common = ["--preset", "tiny-2025", "--val-every", "0", "--out", str(out), *SMALL_RUN]
    run_cli("train", *common, "--steps", "2", "--save-every", "1", "--keep", "0")
    (out / "notes.txt").write_text("mine")
    run_cli("train", *common, "--steps", "1", "--overwrite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # not step_000002 beside it
    assert [m["step"] for m in read_metrics(out)] == [1, 1]  # the new run's train and final val records only
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed


def test_a_running_run_holds_its_directory(tmp_path):
    """While a run trains, its directory is claimed: another `speedrun train` into it, overwriting
    or resuming, is refused before it touches a file; the claim ends with the process, even killed."""
    from speedrun import rundir
    from speedrun.errors import UsageError

    run = tmp_path / "run"
    first = subprocess.Popen(speedrun_cmd("train", "--preset", "tiny-2025", "--steps", "1000", "--val-every", "0",
                                          "--out", str(run), *SMALL_RUN), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.toml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and (run / "config.toml").exists()
        refusal = (f"speedrun train: error: {run}: another speedrun train is running in this run directory; "
                   "wait for it to end or choose another --out")
        for how in (["--overwrite"], ["--resume", "auto"]):
            r = run_cli("train", "--preset", "tiny-2025", "--out", str(run), *how, *SMALL_RUN, check=False)
            assert r.returncode == 2 and r.stderr.strip().splitlines() == [refusal], how
            assert (run / "config.toml").exists() and first.poll() is None
        with pytest.raises(UsageError, match="another speedrun train is running"):
            rundir.claim(run)
    finally:
        first.kill()
        first.wait()
    rundir.claim(run)  # the killed run's claim went with it
    rundir.release()


def test_default_run_directories_never_collide(tmp_path):
    from speedrun import rundir
    made = {rundir.new_default(tmp_path) for _ in range(5)}  # all within the same second or two
    assert len(made) == 5 and all(p.is_dir() for p in made)


def test_resume_applies_steps_and_data_and_refuses_other_changes(four_step_run, tmp_path):
    """--steps extends a resumed run and --data points it at moved shards; a change the checkpoint
    cannot take (a learning rate) is refused, naming the key, with nothing written."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(four_step_run, run)
    before = _snapshot(run)
    r = run_cli("train", "--resume", str(run), "--set", "optim.lr_hidden=0.1", check=False)
    assert r.returncode == 2 and "optim.lr_hidden cannot change on resume" in r.stderr.strip().splitlines()[-1]
    assert _snapshot(run) == before
    from speedrun.data.corpus import builtin_corpus_dir
    moved = tmp_path / "moved-data"
    shutil.copytree(builtin_corpus_dir(), moved)
    run_cli("train", "--resume", str(run), "--steps", "6", "--data", str(moved))
    records = read_metrics(run)
    assert max(m["step"] for m in records) == 6 and [m["step"] for m in records if "train_loss" in m] == list(range(1, 7))
    log = (run / "log.txt").read_text()
    assert "changed on resume: train.steps: 4 -> 6" in log and f"changed on resume: data.dir: '' -> '{moved}'" in log
    assert tomllib.loads((run / "config.toml").read_text())["data"]["dir"] == str(moved)

