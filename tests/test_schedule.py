"""`speedrun schedule`: the record's schedules step by step, checked against the January-2025
record's numbers (1770 steps), without a GPU."""

import json

import pytest

from conftest import run_cli_here
from speedrun.cli import main
from speedrun.config import load_config
from speedrun.errors import UsageError
from speedrun.schedule import change_rows, check_plot_path, format_table, schedule_rows

T = 1770


def schedule(capsys, *args: str) -> str:
    """stdout of `speedrun schedule ARGS` run in this process: no second torch import."""
    assert main(["schedule", *args]) == 0
    return capsys.readouterr().out


def record_long_window(step: int, total: int = T) -> int:
    """The record's rule as the record states it: 1728·s/T rounded up to a multiple of 128, at
    least 128 (integer arithmetic, so no float rounding decides a boundary)."""
    return max(-(-1728 * step // (total * 128)), 1) * 128


def record_lr(step: int, total: int = T) -> float:
    w = min((total - step) / total / 0.4, 1.0)
    return w + (1 - w) * 0.1


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(run_cli_here("schedule", "--preset", "gpt2-speedrun-2025", "--json").stdout)


def test_record_header(record):
    assert (record["preset"], record["steps"], record["window_block"]) == ("gpt2-speedrun-2025", T, 128)
    assert [r["step"] for r in record["rows"]] == list(range(T + 1))


def test_record_windows(record):
    rows = record["rows"]
    expected = {0: (128, 128), 131: (128, 128), 132: (256, 128), 1062: (1152, 512), 1063: (1152, 512),
                1769: (1792, 896), 1770: (1792, 896)}
    for s, (long, short) in expected.items():
        assert (rows[s]["window_long_tokens"], rows[s]["window_short_tokens"]) == (long, short), s
    for r in rows:
        long = record_long_window(r["step"])
        assert r["window_long_tokens"] == long and r["window_long_blocks"] == long // 128
        # Half the long blocks, floored, never fewer than one: 1 and 2 long blocks both give 1.
        assert r["window_short_blocks"] == max(long // 128 // 2, 1)
        assert r["window_short_tokens"] == r["window_short_blocks"] * 128


def test_record_lr_and_momentum(record):
    rows = record["rows"]
    assert all(r["lr"] == 1.0 for r in rows[:1063])
    assert rows[1770]["lr"] == 0.1
    for s in (1063, 1769):
        assert rows[s]["lr"] == pytest.approx(record_lr(s), rel=1e-12, abs=0)
    cooldown = [r["lr"] for r in rows[1062:]]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    assert rows[0]["muon_momentum"] == 0.85
    assert rows[150]["muon_momentum"] == pytest.approx(0.90, abs=1e-12)
    assert all(r["muon_momentum"] == 0.95 for r in rows[300:])
    assert all(r["muon_momentum"] < 0.95 for r in rows[:300])


def test_record_batch_constant(record):
    assert {(r["tokens_per_step"], r["seq_len"]) for r in record["rows"]} == {(393216, 49152)}


def test_steps_scales_every_schedule(capsys):
    out = json.loads(schedule(capsys, "--preset", "gpt2-speedrun-2025", "--steps", "177", "--json"))
    rows = out["rows"]
    assert out["steps"] == 177 and len(rows) == 178
    assert rows[0]["window_long_tokens"] == 128 and rows[-1]["window_long_tokens"] == 1792
    assert rows[-2]["window_long_tokens"] == 1792
    assert rows[-1]["lr"] == 0.1 and rows[106]["lr"] == 1.0 and rows[107]["lr"] < 1.0
    # The Muon warmup keeps its fraction of the run: 300 of 1770 steps -> 30 of 177.
    assert rows[29]["muon_momentum"] < 0.95 and rows[30]["muon_momentum"] == 0.95


def test_table_lists_every_change_point(record, capsys):
    out = schedule(capsys, "--preset", "gpt2-speedrun-2025")
    lines = out.splitlines()
    assert lines[0].startswith("gpt2-speedrun-2025: 1770 steps; rows where a value changes")
    printed = {int(line.split()[0]) for line in lines if line.split()[0].isdigit()}
    rows = record["rows"]
    window_changes = {s for s in range(1, T + 1)
                      if rows[s]["window_long_tokens"] != rows[s - 1]["window_long_tokens"]
                      or rows[s]["window_short_tokens"] != rows[s - 1]["window_short_tokens"]}
    assert {132, 394, 1705} <= window_changes
    # Windows change, Muon momentum stops rising (300), the lr cooldown starts (1062), first, last.
    assert printed == window_changes | {0, 300, 1062, T}
    row = next(line for line in lines if line.split()[0] == "132")
    assert row.split()[1:] == ["0", "1.0000", "0.8940", "256", "(2)", "128", "(1)", "393,216", "49,152", "—"]


def test_token_granularity_halves_the_window():
    cfg = load_config("tiny-2025", None, ["model.window_granularity=token"])
    for r in schedule_rows(cfg):
        assert r["window_short_tokens"] == r["window_long_tokens"] // 2
        assert r["window_short_blocks"] == r["window_short_tokens"] / cfg.model.window_block
    # 64 tokens is half a block: the table shows tokens only.
    assert "     64 " in format_table("tiny-2025", schedule_rows(cfg), None, cfg)


def test_no_window_and_no_muon():
    cfg = load_config("gpt2-baseline", None, [])
    rows = schedule_rows(cfg)
    assert rows[0]["window_long_tokens"] is None and rows[0]["muon_momentum"] is None
    steps, smooth = change_rows(rows)
    # A cosine bends at every step; the table samples it instead of printing thousands of rows.
    assert smooth == ["lr"] and len(steps) < 50 and steps[0] == 0 and steps[-1] == cfg.train.steps
    assert "full" in format_table("gpt2-baseline", rows, None, cfg)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "schedule.png"
    r = run_cli_here("schedule", "--preset", "gpt2-speedrun-2025", "--plot", str(path))
    assert r.stdout.strip() == str(path)
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG")


def test_plot_bad_folder_is_one_line(tmp_path):
    path = tmp_path / "missing" / "schedule.png"
    r = run_cli_here("schedule", "--preset", "gpt2-speedrun-2025", "--plot", str(path), check=False)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr and not path.parent.exists()


def test_plot_path_checks(tmp_path):
    with pytest.raises(UsageError, match="directory"):
        check_plot_path(str(tmp_path))
    with pytest.raises(UsageError, match="cannot write"):
        check_plot_path(str(tmp_path / "schedule.xyz"))
    assert check_plot_path(str(tmp_path / "schedule.png")) == tmp_path / "schedule.png"


@pytest.mark.parametrize("command", ["schedule", "doctor"])
def test_an_empty_preset_is_an_unknown_one_not_the_default(command):
    r = run_cli_here(command, "--preset", "", check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"speedrun {command}: error: unknown preset ''; choose one of: baseline-tiny, "
                                "gpt2-baseline, gpt2-medium-speedrun, gpt2-speedrun, gpt2-speedrun-2025, tiny, tiny-2025")
