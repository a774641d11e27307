import json
import math

import numpy as np
import pytest
from scipy import stats

from speedrun import analysis, cli
from speedrun.config import load_config, to_toml

VAL_SET = {"sha256": "ab" * 32, "tokens": 10485760}


def make_run(path, *, final=3.27, time_ms=180_000.0, steps=200, val_every=25, sets=(), seed=0, val_set=VAL_SET,
             val=None, mfu=0.4, label="gpt2-speedrun-2025"):
    """A run directory as `speedrun train --out` leaves it: an exponential-ish loss curve from
    ln(vocab) down to `final`, a train record every step and a val record every `val_every`."""
    cfg = load_config("gpt2-speedrun-2025", overrides=[f"train.steps={steps}", f"train.seed={seed}", *sets])
    path.mkdir(parents=True)
    (path / "config.toml").write_text(to_toml(cfg))
    tokens_per_step = cfg.data.batch_tokens
    curve = lambda s: final + (10.83 - final) * (math.exp(-8 * s / steps) - math.exp(-8)) + 0.02 * (1 - s / steps)
    t = lambda s: time_ms * s / steps
    if val is None:
        val = [(s, t(s), curve(s)) for s in sorted({*range(0, steps, val_every), steps})]
    records = []
    for step in range(1, steps + 1):
        rec = {"step": step, "tokens": step * tokens_per_step, "train_time_ms": t(step), "train_loss": curve(step) + 0.05,
               "lr": 1.0, "tokens_per_s": step * tokens_per_step / (t(step) / 1000)}
        if mfu is not None:
            rec["mfu"] = mfu
        records.append(rec)
    records += [{"step": s, "tokens": s * tokens_per_step, "train_time_ms": tm, "val_loss": loss} for s, tm, loss in val]
    records.sort(key=lambda r: (r["step"], "val_loss" in r))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"config": label, "final_val_loss": val[-1][2], "train_time_ms": val[-1][1], "steps": steps,
               "tokens": steps * tokens_per_step, "world_size": 8, "peak_memory_mib": 30000.0, "warmup_s": 40.0}
    if val_set is not None:
        summary["val_set"] = val_set
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def speedrun(monkeypatch, *argv):
    # The real CLI entry (error printing, exit codes) with only this module's commands registered.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["speedrun.analysis"])
    return cli.main(list(map(str, argv)))


def test_plot_draws_one_val_line_per_run_and_writes_a_png(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "fast-s0", final=3.27, seed=0)
    b = make_run(tmp_path / "fast-s1", final=3.275, seed=1)
    c = make_run(tmp_path / "baseline", final=3.40, time_ms=600_000, sets=["model.n_layer=11",
                                                                            'model.long_short_pattern="LSSSLSSLSSL"'])
    fig = analysis.plot_runs(analysis.load_runs([a, b, c]), x="time", targets=[3.28], train=True)
    ax = fig.axes[0]
    val_lines = [l for l in ax.get_lines() if l.get_gid() == "val"]
    train_lines = [l for l in ax.get_lines() if l.get_gid() == "train"]
    assert [l.get_label() for l in val_lines] == ["fast-s0", "fast-s1", "baseline"]
    assert [l.get_color() for l in train_lines] == [l.get_color() for l in val_lines]
    raw_lines = [l for l in ax.get_lines() if l.get_gid() == "train_raw"]
    assert [l.get_color() for l in raw_lines] == [l.get_color() for l in val_lines]
    assert all(raw.get_alpha() < smooth.get_alpha() for raw, smooth in zip(raw_lines, train_lines))
    assert [l.get_ydata()[-1] for l in raw_lines] != [l.get_ydata()[-1] for l in train_lines]
    assert [l.get_label() for l in ax.get_lines() if l.get_gid() == "target"] == ["target 3.28"]
    assert ax.get_xlabel() == "training time (minutes)"
    lo, hi = ax.get_ylim()
    assert lo < 3.27 and 3.40 < hi < 10  # the first losses (~10.8) are cut off so the ends are readable

    monkeypatch.chdir(tmp_path)
    assert speedrun(monkeypatch, "plot", a, b, c, "--x", "tokens", "--train") == 0
    out = tmp_path / "loss.png"
    assert capsys.readouterr().out.strip() == "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 2_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (990, 605)


@pytest.mark.parametrize("out,written", [("figs", "figs/loss.png"), ("curve", "curve.png"),
                                         ("a.b/curve", "a.b/curve.png"), ("curve.svg", "curve.svg")])
def test_plot_prints_the_file_it_wrote(tmp_path, monkeypatch, capsys, out, written):
    """An existing directory gets loss.png inside, a name without an extension the PNG matplotlib
    would write there (it adds .png); the path printed is the file written, and nothing else is."""
    run = make_run(tmp_path / "runs" / "a")
    (tmp_path / "figs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert speedrun(monkeypatch, "plot", run, "--out", out) == 0
    assert capsys.readouterr().out.strip() == written
    assert (tmp_path / written).is_file()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and "runs" not in p.parts) \
        == [written]



def test_plot_into_a_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "a")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert speedrun(monkeypatch, "plot", run, "--out", afile / "curve.png") == 2
    assert capsys.readouterr().err.strip() == (f"speedrun plot: error: --out {afile / 'curve.png'}: its folder "
                                               f"{afile}: exists and is not a folder")
    assert afile.read_text() == "x"

def test_compare_interpolates_time_to_loss_and_ratios(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "a", val=[(0, 0.0, 10.8), (100, 10_000.0, 4.0), (200, 20_000.0, 3.5), (300, 30_000.0, 3.2)],
                 steps=300)
    b = make_run(tmp_path / "b", val=[(0, 0.0, 10.8), (150, 20_000.0, 3.6), (300, 45_000.0, 3.3)], steps=300, mfu=None)
    assert speedrun(monkeypatch, "compare", a, b, "--json") == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    # 3.28 lies 0.22/0.30 of the way from 3.5 (at 20 s) down to 3.2 (at 30 s)
    assert rows[0]["time_to_loss_ms"] == pytest.approx(20_000 + 10_000 * 0.22 / 0.30)
    assert rows[1]["time_to_loss_ms"] is None
    assert [r["time_ratio"] for r in rows] == [1.0, 1.5]
    assert rows[0]["mfu"] == 0.4 and rows[1]["mfu"] is None
    assert rows[0]["tokens_per_s"] == pytest.approx(300 * 393216 / 30)

    assert speedrun(monkeypatch, "compare", a, b, "--loss", "3.5") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "config", "val", "loss", "time", "(s)", "tokens", "tok/s", "MFU", "time", "to",
                                "3.5", "(s)", "time", "ratio"]
    assert lines[2].split() == ["a", "gpt2-speedrun-2025", "3.2000", "30.00", "118M", "3.93M", "40.0%", "20.00", "1.00×"]
    # b: 3.5 between 3.6 at 20 s and 3.3 at 45 s -> 20 + 25/3
    assert lines[3].split() == ["b", "gpt2-speedrun-2025", "3.3000", "45.00", "118M", "2.62M", "—", "28.33", "1.50×"]


def test_record_matches_scipy_and_numpy(tmp_path, monkeypatch, capsys):
    losses = [3.2771, 3.2795, 3.2760, 3.2783, 3.2801]
    times = [178_100.0, 179_400.0, 177_900.0, 180_200.0, 178_800.0]
    runs = [make_run(tmp_path / f"s{i}", final=l, time_ms=t, seed=i, sets=[f"train.compile={i % 2 == 0}".lower()])
            for i, (l, t) in enumerate(zip(losses, times))]
    expect = stats.ttest_1samp(losses, 3.28, alternative="less")

    assert speedrun(monkeypatch, "record", *runs, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 5 and res["target"] == 3.28
    assert res["loss_mean"] == pytest.approx(np.mean(losses), abs=1e-12)
    assert res["loss_std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-12)
    assert res["p"] == pytest.approx(expect.pvalue, rel=1e-9) and res["t"] == pytest.approx(expect.statistic)
    assert res["time_mean_s"] == pytest.approx(np.mean(times) / 1000)
    assert res["time_std_s"] == pytest.approx(np.std(times, ddof=1) / 1000)

    assert speedrun(monkeypatch, "record", *runs, "--alpha", "0.05") == 0
    out = capsys.readouterr().out
    assert f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}" in out
    assert f"p           {expect.pvalue:.4g}" in out
    verdict = "record holds" if expect.pvalue < 0.05 else "not significant"
    assert f"verdict     {verdict}" in out
    row = out.strip().splitlines()[-1]
    assert row.startswith(f"| 2.98 min | {np.mean(losses):.4f} ± ") and row.endswith("| gpt2-speedrun-2025 |")


def test_record_refuses_mixed_configs_val_sets_and_single_runs(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", sets=["optim.lr_hidden=0.06"])
    c = make_run(tmp_path / "c", val_set={"sha256": "cd" * 32, "tokens": 10485760})

    assert speedrun(monkeypatch, "record", a, b) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speedrun record: error: runs a and b have different configs (optim.lr_hidden = 0.05 vs 0.06)")
    assert "\n" not in err

    assert speedrun(monkeypatch, "record", a, c) == 2
    err = capsys.readouterr().err.strip()
    assert "runs a and c were validated on different val sets" in err and "\n" not in err

    assert speedrun(monkeypatch, "record", a) == 2
    assert "at least 2 runs" in capsys.readouterr().err


def test_bad_run_directories_are_one_line_errors(tmp_path, monkeypatch, capsys):
    assert speedrun(monkeypatch, "compare", tmp_path / "nope") == 1
    assert capsys.readouterr().err.strip() == f"speedrun compare: error: {tmp_path / 'nope'}: no such run directory"

    a = make_run(tmp_path / "a")
    lines = (a / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (a / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert speedrun(monkeypatch, "plot", a) == 1
    assert capsys.readouterr().err.strip() == f"speedrun plot: error: {a / 'metrics.jsonl'}: line 3 is not JSON"

    b = make_run(tmp_path / "b")
    (b / "summary.json").unlink()
    assert speedrun(monkeypatch, "record", a, b) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"speedrun record: error: {a / 'metrics.jsonl'}: line 3")

    assert speedrun(monkeypatch, "compare", b) == 1
    assert capsys.readouterr().err.strip().startswith(f"speedrun compare: error: {b / 'summary.json'}: missing")


def test_record_refuses_duplicated_evidence(tmp_path, monkeypatch, capsys):
    """The same run twice, two runs of one seed, or losses without variance cannot support a
    t-test; each is refused with one line (exit 2) instead of reporting t = -inf, p = 0."""
    a = make_run(tmp_path / "a", final=3.2771, seed=0)
    same_seed = make_run(tmp_path / "again", final=3.2790, seed=0)
    b = make_run(tmp_path / "b", final=3.2771, seed=1)

    assert speedrun(monkeypatch, "record", a, a, "--target", "11") == 2
    err = capsys.readouterr().err.strip()
    assert f"run {a} is given twice" in err and "\n" not in err
    assert speedrun(monkeypatch, "record", a, tmp_path / "." / "a") == 2  # the same directory spelled differently
    assert "given twice" in capsys.readouterr().err

    assert speedrun(monkeypatch, "record", a, same_seed) == 2
    err = capsys.readouterr().err.strip()
    assert "runs a and again have the same seed (0)" in err and "\n" not in err

    assert speedrun(monkeypatch, "record", a, b, "--target", "11") == 2
    err = capsys.readouterr().err.strip()
    assert "zero variance" in err and "\n" not in err


def test_runs_saved_by_config_version_1_compare_with_newer_ones(tmp_path):
    """A record may pool a run saved before config version 2 with one saved after: both configs are
    read in the current keys. The old file spells the optimizer optim.muon / muon_lr and has no
    version; the new one optim.hidden_optimizer / lr_hidden and version = 2."""
    new, old = make_run(tmp_path / "new"), make_run(tmp_path / "old", seed=1)
    text = (new / "config.toml").read_text()
    v1 = text.replace("version = 2\n", "").replace('hidden_optimizer = "muon"', "muon = true")
    (old / "config.toml").write_text(v1.replace("lr_hidden = ", "muon_lr = ").replace("seed = 0", "seed = 1"))
    a, b = analysis.load_run(new), analysis.load_run(old)
    assert b.config["optim"]["hidden_optimizer"] == "muon" and b.config["optim"]["lr_hidden"] == 0.05
    assert analysis.config_difference(a, b) is None
    (old / "config.toml").write_text(v1.replace("lr_hidden = 0.05", "muon_lr = 0.06").replace("seed = 0", "seed = 1"))
    assert analysis.config_difference(a, analysis.load_run(old)) == "optim.lr_hidden = 0.05 vs 0.06"


def test_smoothing_starts_at_the_first_value_and_calms_the_noise():
    rng = np.random.default_rng(0)
    noisy = list(4.0 + rng.normal(0, 0.3, 500))
    smooth = analysis.smoothed(noisy)
    assert smooth[0] == noisy[0] and len(smooth) == 500
    assert analysis.smoothed([2.5] * 50) == pytest.approx([2.5] * 50)  # bias-corrected: no ramp from zero
    assert np.std(smooth[100:]) < np.std(noisy[100:]) / 3 and abs(np.mean(smooth[100:]) - 4.0) < 0.05
    assert analysis.smoothed([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # too short to smooth


def test_a_target_far_below_the_curves_is_left_out(tmp_path):
    """It would squash the curves into the top of the figure; one near them is drawn."""
    run = analysis.load_runs([make_run(tmp_path / "a", final=4.5)])
    fig = analysis.plot_runs(run, targets=[3.28])
    assert not [l for l in fig.axes[0].get_lines() if l.get_gid() == "target"]
    assert fig.axes[0].get_ylim()[0] > 4.0
    fig = analysis.plot_runs(run, targets=[4.2])
    assert [l.get_label() for l in fig.axes[0].get_lines() if l.get_gid() == "target"] == ["target 4.2"]
    assert fig.axes[0].get_ylim()[0] < 4.2
