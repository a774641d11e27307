"""What a run writes, read the way its users read it: log.txt line by line, metrics.jsonl against the
lr schedule, summary.json field by field, the checkpoints `--keep` leaves, `train.log_every`, a
replay from the run's own config.toml, the progress bar on a terminal, and the offline W&B run.

The runs are made once per session, all at the start and as many at a time as there are cores (see
`runs`), and shared by every test here, under pytest-xdist too."""

import fcntl
import hashlib
import importlib.util
import json
import math
import os
import platform
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_RUN, read_metrics, speedrun_cmd
from speedrun.prepare import cpu_has_fast_bf16

pytestmark = pytest.mark.slow  # its fixtures train in `speedrun train` processes: about 30 s on 2 cores

AUTO_DTYPE = "bfloat16" if cpu_has_fast_bf16() else "float32"  # activation_dtype = "auto" on this CPU

# SMALL_RUN with half its batch (one sequence of 128 per micro-step, two micro-steps), a quarter of
# its val set and one warm-up step, on the CPU: about 0.5 s a step on one thread, and deterministic.
RUN = [*SMALL_RUN, "--set", "data.micro_batch_seqs=1", "--set", "data.batch_tokens=256", "--set",
       "data.val_tokens=512", "--set", "train.warmup_steps_untimed=1", "--device", "cpu"]
STEPS, VAL_EVERY, SAVE_EVERY, SEED = 9, 3, 3, 3
BATCH_TOKENS, VAL_TOKENS, VAL_SEQ_LEN = 256, 512, 256
VAL_STEPS = [0, 3, 6, 9]
TIMEOUT = 300
# glibc returns every large block (a step's logits, gradients) to the kernel when it is freed, so each
# step faulted in hundreds of MB afresh; kept, the runs take about half the time (a third of it was
# the kernel's). Only the speed changes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def main_args(out: Path, keep: int, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny-2025", "--seed", str(SEED), "--steps", str(STEPS), "--val-every", str(VAL_EVERY),
            "--save-every", str(SAVE_EVERY), "--keep", str(keep), "--out", str(out), *RUN, *extra]


def wandb_env(home: Path) -> dict:
    """Offline W&B with every folder it writes under `home`, and no error reporting: with it,
    `wandb leet inspect` looks up its reporting host even for a local file."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
            "WANDB_DIR": str(home / "dir"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_DATA_DIR": str(home / "data")}


# -- the runs ---------------------------------------------------------------------------------------

def _speedrun(args: list[str], env: dict | None = None) -> dict:
    t0 = time.monotonic()
    r = subprocess.run(speedrun_cmd(*args), capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, **MALLOC_ENV, **(env or {})})
    return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": time.monotonic() - t0}


def run_on_terminal(args: list[str], columns: int = 100, timeout: float = TIMEOUT) -> dict:
    """`speedrun ARGS` with stdin, stdout and stderr on a pseudo-terminal `columns` wide, as typed
    in a shell; returns its exit status and everything it wrote to the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    t0 = time.monotonic()
    proc = subprocess.Popen(speedrun_cmd(*args), stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, **MALLOC_ENV})
    os.close(slave)
    out = bytearray()
    try:
        while True:
            if time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"speedrun {' '.join(args)} on a terminal: still running after {timeout}s")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process and its children closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return {"returncode": proc.wait(timeout=60), "output": out.decode(errors="replace"),
            "seconds": time.monotonic() - t0}


def _job_main(base: Path, _need) -> dict:
    return {"out": str(base / "main"), **_speedrun(main_args(base / "main", keep=2))}


def _job_log_every(base: Path, _need) -> dict:
    # the main run's config but for log_every and --keep 0: its checkpoints are the same steps
    out = base / "log_every"
    return {"out": str(out), **_speedrun(main_args(out, 0, "--set", "train.log_every=3"))}


def _job_replay(base: Path, need) -> dict:
    # as a user repeats a run, from a terminal: its progress bar is what test_progress_bar reads
    original = Path(need("main")["out"])
    out = base / "replay"
    return {"out": str(out), **run_on_terminal(["train", "--config", str(original / "config.toml"), "--out", str(out)])}


def _job_wandb(base: Path, _need) -> dict:
    if importlib.util.find_spec("wandb") is None:
        return {"skip": "the wandb package is not installed (pip install -e '.[dev]')"}
    out = base / "wandb_run"
    env = wandb_env(base / "wandb_home")
    return {"out": str(out), "env": env,
            **_speedrun(["train", "--preset", "tiny-2025", "--steps", "3", "--val-every", "2", "--wandb", "--out", str(out),
                         *RUN], env=env)}


# name -> (the runs it reads, how it is made: job(base folder, need), where need(name) waits for a run
# it reads and returns its result); a test asks for a run by its fixture, `<name>_run`.
JOBS = {"main": ((), _job_main), "log_every": ((), _job_log_every), "replay": (("main",), _job_replay),
        "wandb": ((), _job_wandb)}


def _shared_folder(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above every worker's own
    return base / "run-outputs"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """Every run the selected tests read, made once per session: the first worker here makes them
    all at once, as many at a time as there are cores, while any other waits on the lock and then
    reads what they left."""
    wanted = {name for item in request.session.items if getattr(item, "module", None) is request.module
              for name in JOBS if f"{name}_run" in item.fixturenames}
    for name in list(wanted):
        wanted |= set(JOBS[name][0])
    base = _shared_folder(tmp_path_factory)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results_file = base / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        todo = [name for name in JOBS if name in wanted and name not in results]
        if todo:
            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
                futures: dict = {}

                def need(name: str) -> dict:
                    return results[name] if name in results else futures[name].result()

                for name in todo:  # in JOBS order: a run is submitted after the runs it reads
                    futures[name] = pool.submit(JOBS[name][1], base, need)
                for name, future in futures.items():
                    try:
                        results[name] = future.result()
                    except Exception as e:  # noqa: BLE001 -- recorded, and raised by the tests that read it
                        results[name] = {"error": f"{type(e).__name__}: {e}"}
            results_file.write_text(json.dumps(results))
    return results


def _finished(runs: dict, name: str) -> dict:
    r = runs[name]
    if "skip" in r:
        pytest.skip(r["skip"])
    assert "error" not in r, f"the {name} run failed: {r['error']}"
    assert r["returncode"] == 0, (f"the {name} run exited {r['returncode']}:\n"
                                  f"{r.get('stdout', '')}{r.get('stderr', '')}{r.get('output', '')}")
    return {**r, "out": Path(r["out"])}


@pytest.fixture(scope="module")
def main_run(runs):
    return _finished(runs, "main")


@pytest.fixture(scope="module")
def log_every_run(runs):
    return _finished(runs, "log_every")


@pytest.fixture(scope="module")
def replay_run(runs):
    return _finished(runs, "replay")


@pytest.fixture(scope="module")
def wandb_run(runs):
    return _finished(runs, "wandb")


# -- reading log.txt --------------------------------------------------------------------------------

HEADER = [
    ("versions", r"python (?P<python>\S+)  torch (?P<torch>\S+)  cuda (?P<cuda>\S+)"),
    ("device", r"device: (?P<device>.+)  world_size: (?P<world_size>\d+)"),
    ("config", r"config: (?P<config>\S+)  data: (?P<data>.+)"),
    ("size", r"parameters: (?P<parameters>[\d,]+)  grad_accum: (?P<grad_accum>\d+)  tokens/step: (?P<tokens>[\d,]+)"),
    ("path", r"path: (?P<path>attention: .+)"),
    ("warmup", r"warm-up: (?P<steps>\d+) untimed steps in (?P<seconds>\d+\.\d)s \(compile included\)"),
]
TRAIN_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) train_time:(?P<time>\d+)ms step_avg:(?P<avg>\d+\.\d\d)ms")
VAL_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<loss>\d+\.\d{4}) train_time:(?P<time>\d+)ms "
                      r"step_avg:(?P<avg>\d+\.\d\d)ms")
PEAK_LINE = re.compile(r"peak memory: (?P<mib>\d+) MiB")
FINAL_LINE = re.compile(r"final val_loss:(?P<loss>\d+\.\d{4}) train_time:(?P<seconds>\d+\.\d)s steps:(?P<steps>\d+) "
                        r"run dir: (?P<dir>.+)")


def parse_log(path: Path) -> dict:
    """log.txt as its grammar: six header lines, then only step lines, then the peak memory and the
    final line. Any line out of place fails."""
    lines = path.read_text().splitlines()
    assert len(lines) >= len(HEADER) + 2, lines
    header = {}
    for (name, pattern), line in zip(HEADER, lines):
        m = re.fullmatch(pattern, line)
        assert m, f"log.txt header line {name!r} does not read as {pattern!r}: {line!r}"
        header[name] = m.groupdict()
    header["path"] = dict(re.findall(r"(\w+): (.*?)(?=  \w+: |$)", header["path"]["path"]))
    steps = []
    for line in lines[len(HEADER):-2]:
        if m := TRAIN_LINE.fullmatch(line):
            kind = "train"
        elif m := VAL_LINE.fullmatch(line):
            kind = "val"
        else:
            raise AssertionError(f"log.txt: not a step line: {line!r}")
        steps.append({"kind": kind, "step": int(m["step"]), "total": int(m["total"]), "time": int(m["time"]),
                      "avg": float(m["avg"]), "loss": m.groupdict().get("loss")})
    peak, final = PEAK_LINE.fullmatch(lines[-2]), FINAL_LINE.fullmatch(lines[-1])
    assert peak and final, lines[-2:]
    return {"header": header, "steps": steps, "peak": peak.groupdict(), "final": final.groupdict()}


def expected_events(steps: int, val_steps: list[int]) -> list[tuple[int, str]]:
    """(step, kind) in the order a run writes them: validation before step 1, then every step, each
    validation step's line right after its train line."""
    events = [(0, "val")] if 0 in val_steps else []
    for n in range(1, steps + 1):
        events += [(n, "train")] + ([(n, "val")] if n in val_steps else [])
    return events


def run_config(run_dir: Path):
    from speedrun.config import load_config
    return load_config(None, run_dir / "config.toml")


# -- 1. log.txt -------------------------------------------------------------------------------------

def test_log_header_names_versions_device_config_size_path_and_warmup(main_run):
    from speedrun.data.corpus import builtin_corpus_dir
    out = main_run["out"]
    log, summary, cfg = parse_log(out / "log.txt"), json.loads((out / "summary.json").read_text()), run_config(out)
    h = log["header"]
    assert h["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                             "cuda": torch.version.cuda or "none"}
    assert h["device"] == {"device": summary["path"]["device"], "world_size": "1"}
    assert h["device"]["device"].startswith("CPU ")
    assert h["config"] == {"config": "tiny-2025", "data": str(builtin_corpus_dir())}
    assert int(h["size"]["grad_accum"]) == cfg.data.batch_tokens // (cfg.data.seq_len * cfg.data.micro_batch_seqs) == 2
    assert h["size"]["tokens"] == f"{BATCH_TOKENS:,}" and cfg.data.batch_tokens == BATCH_TOKENS
    # the parameter count is that of the weights the run saves
    from safetensors import safe_open
    with safe_open(out / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors", "np") as f:
        saved = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert h["size"]["parameters"] == f"{saved:,}"
    assert list(h["path"]) == ["attention", "head", "activations", "compile", "backend"]
    assert h["path"] == {k: str(summary["path"][k]) for k in h["path"]}
    assert h["path"]["compile"] == ("torch.compile (dynamic=False)" if cfg.train.compile else "eager") == "eager"
    assert h["path"]["attention"] == "sdpa, block windows (record schedule)"  # CPU: no FlexAttention
    assert h["path"]["head"] == h["path"]["activations"] == AUTO_DTYPE
    assert int(h["warmup"]["steps"]) == cfg.train.warmup_steps_untimed == 1
    assert abs(float(h["warmup"]["seconds"]) - summary["warmup_s"]) <= 0.051


def test_log_has_a_line_per_step_and_per_validation_in_order(main_run):
    out = main_run["out"]
    log, records = parse_log(out / "log.txt"), read_metrics(out)
    assert [(s["step"], s["kind"]) for s in log["steps"]] == expected_events(STEPS, VAL_STEPS)
    assert all(s["total"] == STEPS for s in log["steps"])
    times = [s["time"] for s in log["steps"]]
    assert times == sorted(times) and times[0] == 0 and times[-1] > 0  # no training before step 0
    for s in log["steps"][1:]:
        # step_avg is train_time / N, to the precision both are printed with
        assert abs(s["avg"] - s["time"] / s["step"]) <= 0.5 / s["step"] + 0.005 + 1e-9, s
    # the same numbers as metrics.jsonl, record for record
    assert len(records) == len(log["steps"])
    for s, r in zip(log["steps"], records):
        assert (s["step"], s["kind"]) == (r["step"], "val" if "val_loss" in r else "train")
        assert abs(s["time"] - r["train_time_ms"]) <= 0.5 + 1e-3
        if s["kind"] == "val":
            assert s["loss"] == f"{r['val_loss']:.4f}"


def test_log_ends_with_peak_memory_and_the_final_line(main_run):
    out = main_run["out"]
    log, summary = parse_log(out / "log.txt"), json.loads((out / "summary.json").read_text())
    assert int(log["peak"]["mib"]) == round(summary["peak_memory_mib"])
    assert log["final"] == {"loss": f"{summary['final_val_loss']:.4f}", "steps": str(STEPS), "dir": str(out),
                            "seconds": f"{summary['train_time_ms'] / 1000:.1f}"}
    # stdout, not being a terminal, carries the validation lines and the final line
    printed = main_run["stdout"].splitlines()
    assert printed[-1] == (out / "log.txt").read_text().splitlines()[-1]
    assert [line for line in printed if VAL_LINE.fullmatch(line)] == [
        line for line in (out / "log.txt").read_text().splitlines() if VAL_LINE.fullmatch(line)]
    assert printed[-2] == f"loss curve: {out / 'loss.png'}"


def test_a_finished_run_leaves_its_loss_curve(main_run):
    """loss.png in the run directory: the run's val points and its smoothed train loss, as `speedrun
    plot RUN_DIR` draws them."""
    from speedrun.analysis import load_run, plot_runs

    out = main_run["out"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = plot_runs([load_run(out)]).axes[0]
    gids = [line.get_gid() for line in ax.get_lines()]
    assert gids.count("val") == gids.count("train") == gids.count("train_raw") == 1
    val = next(line for line in ax.get_lines() if line.get_gid() == "val")
    assert len(val.get_xdata()) == len([r for r in read_metrics(out) if "val_loss" in r])


# -- 2. metrics.jsonl -------------------------------------------------------------------------------

def test_metrics_records_follow_the_schedule_and_the_clock(main_run):
    from speedrun.optim import lr_multiplier
    out = main_run["out"]
    records, cfg = read_metrics(out), run_config(out)
    assert [(r["step"], "val" if "val_loss" in r else "train") for r in records] == expected_events(STEPS, VAL_STEPS)
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == VAL_STEPS == [0, *range(VAL_EVERY, STEPS + 1, VAL_EVERY)]
    for r in train:
        assert set(r) == {"step", "tokens", "train_time_ms", "train_loss", "lr", "tokens_per_s"}  # no mfu on CPU
        # the lr multiplier of the optimizer step that produced this record (0-based step - 1)
        assert r["lr"] == lr_multiplier(r["step"] - 1, STEPS, cfg.optim), r
        assert r["tokens"] == r["step"] * BATCH_TOKENS
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["train_time_ms"] / 1000), rel=1e-4, abs=0.06)
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
    assert len({r["lr"] for r in train}) > 2  # the cooldown is inside this run, so an off-by-one would show
    for r in val:
        assert set(r) == {"step", "tokens", "train_time_ms", "val_loss"}
        assert r["tokens"] == r["step"] * BATCH_TOKENS
    times = [r["train_time_ms"] for r in records]
    assert times == sorted(times)
    assert all(a["train_time_ms"] < b["train_time_ms"] for a, b in zip(train, train[1:]))  # every step takes time
    # the lr the optimizers held when a checkpoint was written is the last record's
    for ckpt in sorted((out / "checkpoints").iterdir()):
        step = json.loads((ckpt / "state.json").read_text())["step"]
        (record,) = [r for r in train if r["step"] == step]
        groups = [g for opt in torch.load(ckpt / "rank_00000.pt", weights_only=True)["optimizers"]
                  for g in opt["param_groups"]]
        assert groups and all(g["lr"] / g["base_lr"] == pytest.approx(record["lr"], rel=1e-12) for g in groups)


# -- 3. summary.json --------------------------------------------------------------------------------

def test_summary_holds_every_field(main_run):
    out = main_run["out"]
    summary, records, cfg = json.loads((out / "summary.json").read_text()), read_metrics(out), run_config(out)
    last_val = [r for r in records if "val_loss" in r][-1]
    assert set(summary) == {"config", "status", "final_val_loss", "train_time_ms", "steps", "tokens", "world_size",
                            "compiles_on_clock",
                            "peak_memory_mib", "warmup_s", "path", "val_set"}
    assert summary["config"] == "tiny-2025" and summary["status"] == "finished"
    assert last_val["step"] == STEPS
    assert summary["final_val_loss"] == last_val["val_loss"]
    assert summary["train_time_ms"] == last_val["train_time_ms"] > 0
    assert summary["steps"] == cfg.train.steps == STEPS
    assert summary["tokens"] == STEPS * BATCH_TOKENS
    assert summary["world_size"] == 1
    assert summary["peak_memory_mib"] > 0
    assert summary["warmup_s"] >= 0
    assert summary["path"] == {
        "attention": "sdpa, block windows (record schedule)", "head": AUTO_DTYPE, "activations": AUTO_DTYPE,
        "compile": "eager", "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "device": summary["path"]["device"], "backend": summary["path"]["backend"], "world_size": 1}
    assert summary["path"]["device"].startswith("CPU ") and summary["path"]["backend"]
    # the val set's fingerprint, computed here from the shard bytes: the first tokens + 1 (targets)
    from speedrun.data.corpus import builtin_corpus_dir
    (val_file,) = sorted(builtin_corpus_dir().glob(cfg.data.val_pattern))
    tokens = VAL_TOKENS // VAL_SEQ_LEN * VAL_SEQ_LEN
    shard = np.fromfile(val_file, dtype="<u2", offset=256 * 4)
    assert summary["val_set"] == {"sha256": hashlib.sha256(shard[:tokens + 1].tobytes()).hexdigest(), "tokens": tokens}


# -- 4. --keep -------------------------------------------------------------------------------------

def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("which, keep, kept", [("main", 2, [6, 9]), ("log_every", 0, [3, 6, 9])])
def test_keep_leaves_the_newest_checkpoints(main_run, log_every_run, which, keep, kept):
    """Both runs save at steps 3 and 6 (--save-every 3) and at the end: --keep 2 leaves the newest
    two, --keep 0 all of them, each whole."""
    out = {"main": main_run, "log_every": log_every_run}[which]["out"]
    assert run_config(out).train.keep == keep
    assert _checkpoints(out) == [f"step_{s:06d}" for s in kept]  # and no .tmp- folder left behind
    for step in kept:
        ckpt = out / "checkpoints" / f"step_{step:06d}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.toml", "model.safetensors", "rank_00000.pt",
                                                          "state.json"]
        assert json.loads((ckpt / "state.json").read_text())["step"] == step


def test_checkpoints_past_a_million_steps_are_ordered_by_step(tmp_path):
    from speedrun import checkpoint
    for step in (999_999, 1_000_000):
        ckpt = tmp_path / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    assert checkpoint.find_resume(tmp_path, "auto").name == "step_1000000"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_999999", "step_1000000"]


# -- 5. train.log_every -----------------------------------------------------------------------------

def test_log_every_still_writes_every_step_with_the_same_losses(main_run, log_every_run):
    """With losses fetched every 3rd step, every step still gets its record and its log line, in
    order, and the numbers are those of a run that fetches them every step."""
    fast, slow = read_metrics(log_every_run["out"]), read_metrics(main_run["out"])
    assert run_config(log_every_run["out"]).train.log_every == 3 and run_config(main_run["out"]).train.log_every == 1
    assert [(r["step"], "val" if "val_loss" in r else "train") for r in fast] == expected_events(STEPS, VAL_STEPS)
    log = parse_log(log_every_run["out"] / "log.txt")
    assert [(s["step"], s["kind"]) for s in log["steps"]] == expected_events(STEPS, VAL_STEPS)
    assert [s["loss"] for s in log["steps"]] == [s["loss"] for s in parse_log(main_run["out"] / "log.txt")["steps"]]
    keys = ("step", "tokens", "train_loss", "val_loss", "lr")
    assert [{k: r[k] for k in keys if k in r} for r in fast] == [{k: r[k] for k in keys if k in r} for r in slow]
    times = [r["train_time_ms"] for r in fast]
    assert times == sorted(times)


# -- 6. replay --------------------------------------------------------------------------------------

def test_replaying_config_toml_repeats_the_run(main_run, replay_run):
    original, replay = main_run["out"], replay_run["out"]
    assert (replay / "config.toml").read_text() == (original / "config.toml").read_text()
    a_losses, b_losses = ([(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run)]
                          for run in (original, replay))
    assert b_losses == a_losses and len(b_losses) == len(expected_events(STEPS, VAL_STEPS))
    a, b = (json.loads((run / "summary.json").read_text()) for run in (original, replay))
    assert b["final_val_loss"] == a["final_val_loss"] and b["val_set"] == a["val_set"]
    assert b["config"] == str(original / "config.toml")  # a replay is labelled with the file it came from


# -- 7. the progress bar ----------------------------------------------------------------------------

BAR = re.compile(r"(\d+)%\|[^|\r\n]*\| (\d+)/(\d+) \[")
RATE = re.compile(r"\d(step/s|s/step)")


def test_progress_bar_only_on_a_terminal(main_run, replay_run):
    on_terminal = replay_run["output"]
    bars = [(int(p), int(n), int(t)) for p, n, t in BAR.findall(on_terminal)]
    assert bars and bars[-1] == (100, STEPS, STEPS), on_terminal[-2000:]
    assert [n for _, n, _ in bars] == sorted(n for _, n, _ in bars) and {t for _, _, t in bars} == {STEPS}
    assert RATE.search(on_terminal) and "val_loss=" in on_terminal  # the rate, and validation in the postfix
    assert on_terminal.rstrip().splitlines()[-1].startswith("final val_loss:")
    # the main run's stderr was a pipe: no bar, and nothing else drawn
    assert not BAR.search(main_run["stderr"]) and not RATE.search(main_run["stderr"]) and "\r" not in main_run["stderr"]
    assert not BAR.search(main_run["stdout"])


# -- 8. Weights & Biases, offline -------------------------------------------------------------------

def test_wandb_offline_run_holds_every_record(wandb_run):
    out = wandb_run["out"]
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    (log_file,) = run_dir.glob("run-*.wandb")
    assert log_file.stat().st_size > 0
    env = {**os.environ, **wandb_run["env"]}
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                       text=True, env=env, timeout=120)
    if r.returncode != 0 and ("No such command" in r.stderr or "no such option" in r.stderr.lower()):
        pytest.skip(f"this wandb cannot read a run back (`wandb leet inspect --json`): {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    (run,) = [e["run"] for e in entries if e["type"] == "run"]
    assert (run["display_name"], run["project"]) == (out.name, "speedrun")
    logged_config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert logged_config == tomllib.loads((out / "config.toml").read_text())
    rows = [e["history"] for e in entries if e["type"] == "history"]
    history = {row.get("step", {}).get("num", 0): row["item"] for row in rows}
    assert len(history) == len(rows)
    records = read_metrics(out)
    # one history row per step: a step's train and val records share it, the val record written last
    assert sorted(history) == sorted({r["step"] for r in records}) == [0, 1, 2, 3]
    for r in records:
        row = history[r["step"]]
        fields = ("val_loss", "train_time_ms", "tokens") if "val_loss" in r else ("train_loss", "lr", "tokens_per_s",
                                                                                  "tokens")
        assert {k: row.get(k) for k in fields} == {k: r[k] for k in fields}, (r, row)
    assert [e["exit"].get("exit_code", 0) for e in entries if e["type"] == "exit"] == [0]
