"""The researcher's loop on real (short) CPU runs: plot, compare, record, bench, TensorBoard."""

import json
import re
import statistics

import numpy as np
import pytest
from scipy import stats

from conftest import SMALL_RUN, run_cli, run_cli_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    dirs = {}
    for name, preset, seed in [("tiny-a", "tiny-2025", 1), ("tiny-b", "tiny-2025", 2), ("base", "baseline-tiny", 1)]:
        dirs[name] = root / name
        extra = ["--tensorboard"] if name == "tiny-a" else []
        run_cli("train", "--preset", preset, "--steps", "6", "--val-every", "3", "--seed", str(seed),
                "--out", str(dirs[name]), *SMALL_RUN, *extra)
    return dirs


def test_plot_draws_one_val_curve_per_run(runs, tmp_path):
    out = tmp_path / "loss.png"
    run_cli_here("plot", *map(str, runs.values()), "--out", str(out), "--x", "tokens")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    from speedrun.analysis import load_run, plot_runs

    fig = plot_runs([load_run(p) for p in runs.values()], x="tokens")
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels[:3] == ["tiny-a", "tiny-b", "base"]


def test_compare_lists_every_run_with_ratio_to_the_first(runs):
    r = run_cli_here("compare", *map(str, runs.values()), "--json")
    rows = json.loads(r.stdout)["runs"]
    assert [row["run"] for row in rows] == ["tiny-a", "tiny-b", "base"]
    for row, path in zip(rows, runs.values()):
        summary = json.loads((path / "summary.json").read_text())
        assert row["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    assert rows[0]["time_ratio"] == pytest.approx(1.0)


def test_record_matches_scipy_and_refuses_mixed_configs(runs):
    tiny = [runs["tiny-a"], runs["tiny-b"]]
    losses = [json.loads((p / "summary.json").read_text())["final_val_loss"] for p in tiny]
    target = max(losses) + 0.5
    r = run_cli_here("record", *map(str, tiny), "--target", str(target), "--json")
    result = json.loads(r.stdout)
    assert result["n"] == 2
    assert result["loss_mean"] == pytest.approx(np.mean(losses))
    assert result["loss_std"] == pytest.approx(statistics.stdev(losses))
    assert result["p"] == pytest.approx(stats.ttest_1samp(losses, target, alternative="less").pvalue)
    mixed = run_cli_here("record", str(runs["tiny-a"]), str(runs["base"]), check=False)
    assert mixed.returncode == 2 and "different configs" in mixed.stderr


def test_tensorboard_logs_read_back_with_tensorboards_reader(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["tiny-a"] / "tensorboard"))
    acc.Reload()
    metrics = [json.loads(line) for line in (runs["tiny-a"] / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("val_loss")] == val
    assert len(acc.Scalars("train_loss")) == 6


def test_bench_reports_both_presets_and_their_ratio(capsys):
    r = run_cli("bench", "--preset", "tiny-2025", "--vs", "baseline-tiny", "--steps", "2", "--warmup", "1", "--no-compile",
                "--device", "cpu", *[a for a in SMALL_RUN if a != "--no-compile"], "--json")
    report = json.loads(r.stdout)
    a, b = report["results"]
    assert (a["preset"], b["preset"]) == ("tiny-2025", "baseline-tiny")
    assert report["ratio"]["step_ms"] == pytest.approx(a["step_ms"] / b["step_ms"], rel=1e-2)
    assert a["tokens_per_s"] > 0 and a["peak_memory_mib"] > 0
    # the table, in-process (a second process would cost seconds of imports and start-up)
    from speedrun import cli

    assert cli.main(["bench", "--preset", "tiny-2025", "--vs", "baseline-tiny", "--steps", "1", "--warmup", "1",
                     "--no-compile", "--device", "cpu", *[a for a in SMALL_RUN if a != "--no-compile"]]) == 0
    assert re.search(r"ratio tiny-2025/baseline-tiny: step time [0-9.]+×", capsys.readouterr().out)


def test_bench_times_a_later_stage_with_its_batch():
    from speedrun.bench import measure

    result = measure("tiny", [], steps=1, warmup=1, device="cpu", compile=False, at=120)
    assert (result["at"], result["steps"], result["tokens_per_step"]) == (120, 1, 2048)  # stage 3: one sequence of 2,048 tokens
    assert result["recompiles"] == 0 and result["step_ms"] > 0
