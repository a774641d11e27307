import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from scipy import stats

from speedrun import ablate, analysis, cli
from speedrun.config import Config, load_config, to_dict, to_toml
from speedrun.errors import UsageError

from conftest import SMALL_RUN


def speedrun(monkeypatch, *argv):
    # The real CLI entry (error line, exit code) with only this module's command registered.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["speedrun.ablate"])
    return cli.main(list(map(str, argv)))


def flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("role_lr", "role_weight_decay",
                                                                                   "role_adam_betas") else {f"{prefix}{k}": v})
    return out


class FakeTrain:
    """Stands in for `speedrun train ARGV` in a child process: writes the run directory a finished
    run leaves (its config resolved from ARGV as train would), with the loss and time given per
    (arm, seed), and remembers every call. `crash` names runs that die without writing anything."""

    def __init__(self, losses: dict, times: dict | None = None, crash=()):
        self.losses, self.times, self.crash = losses, times or {}, set(crash)
        self.calls: list[tuple[str, int, list[str]]] = []

    def __call__(self, argv: list[str], folder: Path) -> int:
        arm, seed = folder.parent.name, int(argv[argv.index("--seed") + 1])
        self.calls.append((arm, seed, argv))
        if (arm, seed) in self.crash:
            (folder / ablate.OUTPUT_FILE).write_text("Killed\n")
            return -9
        cfg = ablate.run_config(argv)
        loss, time_ms = self.losses[arm, seed], self.times.get((arm, seed), 1000.0)
        (folder / "config.toml").write_text(to_toml(cfg))
        (folder / "metrics.jsonl").write_text(json.dumps({"step": cfg.train.steps, "tokens": 512, "train_time_ms": time_ms,
                                                          "val_loss": loss}) + "\n")
        (folder / "summary.json").write_text(json.dumps({
            "config": "tiny-2025", "status": "finished", "final_val_loss": loss, "train_time_ms": time_ms,
            "steps": cfg.train.steps, "tokens": 512, "path": {"device": "CPU test", "torch": "2.x", "cuda": "none"}}))
        return 0


# ---------------------------------------------------------------------------------------------
# switches


def test_switches_resolve_bare_and_qualified_keys():
    assert ablate.resolve_switch("qk_norm") == "model.qk_norm"
    assert ablate.resolve_switch("model.qk_norm") == "model.qk_norm"
    assert ablate.resolve_switch("hidden_optimizer") == "optim.hidden_optimizer"
    assert ablate.resolve_switch("stages.seq_len") == "stages.seq_len"
    assert ablate.resolve_switch("data.seq_len") == "data.seq_len"


@pytest.mark.parametrize("name, words", [
    ("seq_len", ["ambiguous", "data.seq_len and stages.seq_len"]),
    ("batch_tokens", ["ambiguous", "data.batch_tokens and stages.batch_tokens"]),
    ("qknorm", ["no such config key", "model.qk_norm"]),
    ("model.qknorm", ["no such config key", "model.qk_norm"]),
    ("optim.qk_norm", ["no such config key"]),  # a real key under the wrong section
    ("zzzzzz", ["no such config key", "keys are section.key"]),
    ("seed", ["train.seed", "cannot be ablated", "--seeds"]),
    ("data.val_tokens", ["cannot be ablated", "val set"]),
    ("compile", ["train.compile", "cannot be ablated"]),
])
def test_bad_switches_are_one_line_errors_naming_close_matches(name, words):
    with pytest.raises(UsageError) as e:
        ablate.resolve_switch(name)
    assert "\n" not in str(e.value) and str(e.value).startswith("--off ")
    for word in words:
        assert word in str(e.value)


def test_variants_split_on_commas_and_refuse_repeats():
    assert ablate.parse_variants(["qk_norm", "x0_mix, model.unet_skips"]) == (
        ("model.qk_norm",), ("model.x0_mix", "model.unet_skips"))
    with pytest.raises(UsageError, match="names model.qk_norm twice"):
        ablate.parse_variants(["qk_norm,model.qk_norm"])
    with pytest.raises(UsageError, match="given twice"):
        ablate.parse_variants(["x0_mix,qk_norm", "qk_norm,x0_mix"])
    with pytest.raises(UsageError, match="empty name"):
        ablate.parse_variants(["qk_norm,"])


def test_every_default_survives_the_set_override_it_is_passed_as():
    # a variant reaches `speedrun train` as --set KEY=<json of the default>; each must read back exactly
    for key in ablate.config_keys():
        if key in ablate.REFUSED:
            continue
        cfg = load_config(None, None, ablate.switch_overrides(ablate.Arm("x", (key,))))
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == getattr(getattr(Config(), section), name), key


# ---------------------------------------------------------------------------------------------
# errors before anything runs


@pytest.mark.parametrize("argv, words", [
    (["--off", "mudd"], ["--off model.mudd: already false", "preset tiny-2025", "equal the base"]),
    (["--off", "qk_norm", "--off", "smear_gate"], ["--off model.smear_gate: already false"]),
    (["--off", "qk_norm", "--set", "model.qk_norm=true"], ["--off model.qk_norm and --set model.qk_norm"]),
    (["--off", "seq_len"], ["ambiguous", "data.seq_len and stages.seq_len"]),
    (["--off", "qknorm"], ["no such config key", "model.qk_norm"]),
    (["--off", "n_head"], ["off-n_head:", "model.n_head"]),  # 12 heads of 64 do not make tiny's 128 dims
    (["--off", "qk_norm", "--set", "train.seed=3"], ["train.seed", "--seeds"]),
    (["--off", "qk_norm", "--seeds", "0"], ["--seeds must be at least 1"]),
    (["--off", "qk_norm", "--steps", "0"], ["--steps must be positive"]),
    (["--off", "qk_norm", "--preset", "nope"], ["unknown preset 'nope'"]),
])
def test_errors_print_one_line_and_leave_nothing_behind(tmp_path, monkeypatch, capsys, argv, words):
    fake = FakeTrain({})
    monkeypatch.setattr(ablate, "launch_train", fake)
    monkeypatch.chdir(tmp_path)
    preset = [] if "--preset" in argv else ["--preset", "tiny-2025"]
    assert speedrun(monkeypatch, "ablate", *preset, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("speedrun ablate: error: ") and err.count("\n") == 1
    for word in words:
        assert word in err
    assert fake.calls == [] and list(tmp_path.iterdir()) == []


def test_an_out_folder_holding_something_else_is_refused_untouched(tmp_path, monkeypatch, capsys):
    fake = FakeTrain({})
    monkeypatch.setattr(ablate, "launch_train", fake)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--out", tmp_path / "out") == 2
    assert "holds no ablation" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"] and fake.calls == []
    (tmp_path / "file").write_text("")
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--out", tmp_path / "file") == 2
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the runs


def test_runs_interleave_seeds_and_arms_differ_only_in_their_switches(tmp_path, monkeypatch, capsys):
    arms = ["base", "off-qk_norm", "off-x0_mix+unet_skips"]
    fake = FakeTrain({(a, s): 3.3 for a in arms for s in range(3)})
    monkeypatch.setattr(ablate, "launch_train", fake)
    monkeypatch.chdir(tmp_path)
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--off", "x0_mix,unet_skips",
                    "--seeds", 3, "--steps", 7, "--set", "data.val_tokens=2048", "--no-compile") == 0
    assert [(a, s) for a, s, _ in fake.calls] == [(a, s) for s in range(3) for a in arms]
    out = next((tmp_path / "runs" / "ablate-tiny-2025").iterdir())  # the default folder, runs/ablate-PRESET/<timestamp>
    off = {"base": set(), "off-qk_norm": {"model.qk_norm"}, "off-x0_mix+unet_skips": {"model.x0_mix", "model.unet_skips"}}
    for arm, seed, argv in fake.calls:
        assert argv[argv.index("--out") + 1] == str(Path("runs") / "ablate-tiny-2025" / out.name / arm / f"seed{seed}")
        assert argv[argv.index("--steps") + 1] == "7" and "--no-compile" in argv
        base = flat(to_dict(load_config("tiny-2025", None, ["data.val_tokens=2048"])))
        mine = flat(to_dict(ablate.run_config(argv)))
        changed = {k for k in base if base[k] != mine[k]}
        # --steps 7 scales tiny's 70-step schedules as `speedrun train --steps 7` does; --no-compile passes on
        scaled = {"train.steps", "train.val_every", "optim.muon_momentum_warmup_steps", "train.compile"}
        assert changed == off[arm] | scaled | ({"train.seed"} if seed else set())
        assert mine["train.seed"] == seed and mine["train.steps"] == 7 and mine["data.val_tokens"] == 2048
        for key in off[arm]:
            assert mine[key] is False
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [f"ablate tiny-2025: 3 arms × 3 seeds = 9 runs in {Path('runs') / 'ablate-tiny-2025' / out.name}",
                           "[1/9] base seed 0: started", "[1/9] base seed 0: val loss 3.3000, train time 1.0 s"]
    assert printed[17] == "[9/9] off-x0_mix+unet_skips seed 2: started"


def test_summary_statistics_match_scipy(tmp_path, monkeypatch, capsys):
    base = [3.300, 3.310, 3.290, 3.305]
    worse = [3.330, 3.345, 3.320, 3.338]
    same = [3.301, 3.296, 3.312, 3.299]
    losses = {**{("base", s): v for s, v in enumerate(base)}, **{("off-qk_norm", s): v for s, v in enumerate(worse)},
              **{("off-x0_mix", s): v for s, v in enumerate(same)}}
    times = {(a, s): 1000.0 * (s + 1) + (500 if a == "off-x0_mix" else 0) for a, s in losses}
    monkeypatch.setattr(ablate, "launch_train", FakeTrain(losses, times))
    out = tmp_path / "abl"
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--off", "x0_mix", "--seeds", 4,
                    "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["arm"]: r for r in summary["arms"]}
    for arm, values in (("base", base), ("off-qk_norm", worse), ("off-x0_mix", same)):
        r = rows[arm]
        assert r["n"] == 4 and r["losses"] == values
        assert r["loss_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert r["loss_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert rows["off-x0_mix"]["time_mean_s"] == pytest.approx(3.0) and rows["base"]["time_mean_s"] == pytest.approx(2.5)
    p_worse = stats.ttest_ind(worse, base, equal_var=False, alternative="greater").pvalue
    p_same = stats.ttest_ind(same, base, equal_var=False, alternative="greater").pvalue
    assert rows["off-qk_norm"]["p"] == pytest.approx(p_worse, rel=1e-12) and p_worse < 0.01 < p_same
    assert rows["off-x0_mix"]["p"] == pytest.approx(p_same, rel=1e-12)
    assert rows["off-qk_norm"]["delta"] == pytest.approx(statistics.mean(worse) - statistics.mean(base), abs=1e-12)
    assert "p" not in rows["base"] and rows["off-qk_norm"]["off"] == ["model.qk_norm"]

    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("off-qk_norm "))
    d = statistics.mean(worse) - statistics.mean(base)
    assert line.split() == ["off-qk_norm", "model.qk_norm", "4", f"{statistics.mean(worse):.4f}", "±",
                            f"{statistics.stdev(worse):.4f}", "2.5", f"{d:+.4f}", f"{p_worse:.3g}"]
    md = (out / "summary.md").read_text()
    assert (f"| off-x0_mix | model.x0_mix | 4 | {statistics.mean(same):.4f} ± {statistics.stdev(same):.4f} | 3.0 | "
            f"{statistics.mean(same) - statistics.mean(base):+.4f} | {p_same:.3g} |") in md
    assert "| base | — | 4 |" in md and summary["command"] in md
    assert summary["command"] == (f"speedrun ablate --preset tiny-2025 --off model.qk_norm --off model.x0_mix --seeds 4 "
                                  f"--out {out}")
    runs = summary["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for s in range(4) for a in ("base", "off-qk_norm", "off-x0_mix")]
    assert all(r["device"] == "CPU test" and r["torch"] == "2.x" and "commit" in r for r in runs)
    launch = json.loads((out / "base" / "seed2" / ablate.LAUNCH_FILE).read_text())
    assert launch["command"][:2] == ["speedrun", "train"] and launch["exit_code"] == 0
    assert launch["commit"] == runs[6]["commit"]


def test_one_seed_gives_no_p_value(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate, "launch_train", FakeTrain({("base", 0): 3.3, ("off-qk_norm", 0): 3.4}))
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1,
                    "--out", tmp_path / "o") == 0
    row = json.loads((tmp_path / "o" / "summary.json").read_text())["arms"][1]
    assert row["p"] is None and row["loss_std"] is None and row["delta"] == pytest.approx(0.1)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("off-qk_norm "))
    assert line.split() == ["off-qk_norm", "model.qk_norm", "1", "3.4000", "1.0", "+0.1000", "n/a"]


def test_a_crashed_run_loses_nothing_else_and_the_same_command_finishes_it(tmp_path, monkeypatch, capsys):
    losses = {(a, s): 3.3 + 0.01 * s for a in ("base", "off-qk_norm") for s in range(3)}
    fake = FakeTrain(losses, crash={("off-qk_norm", 0)})
    monkeypatch.setattr(ablate, "launch_train", fake)
    argv = ["ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 2, "--out", tmp_path / "o"]
    assert speedrun(monkeypatch, *argv) == 1
    assert [(a, s) for a, s, _ in fake.calls] == [("base", 0), ("off-qk_norm", 0), ("base", 1), ("off-qk_norm", 1)]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    crashed = summary["runs"][1]
    assert crashed["status"] == "failed" and crashed["error"] == "Killed"
    assert summary["arms"][1]["n"] == 1 and summary["arms"][0]["n"] == 2 and summary["arms"][1]["p"] is None
    assert summary["notes"] == ["off-qk_norm seed 0 failed: Killed"]
    assert "[2/4] off-qk_norm seed 0: failed: Killed (output: " in capsys.readouterr().out

    fake.calls.clear()
    fake.crash.clear()
    assert speedrun(monkeypatch, *argv) == 0
    assert [(a, s) for a, s, _ in fake.calls] == [("off-qk_norm", 0)]
    printed = capsys.readouterr().out
    assert "continuing the ablation there: 3 of 4 runs finished earlier" in printed
    assert "[1/4] base seed 0: finished earlier, val loss 3.3000" in printed
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["arms"][1]["n"] == 2

    fake.calls.clear()  # more seeds extend the ablation; finished runs stay
    assert speedrun(monkeypatch, *argv[:-4], "--seeds", 3, "--out", tmp_path / "o") == 0
    assert [(a, s) for a, s, _ in fake.calls] == [("base", 2), ("off-qk_norm", 2)]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["seeds"] == 3


def test_a_diverged_run_counts_as_not_finished(tmp_path, monkeypatch, capsys):
    losses = {("base", 0): 3.3, ("base", 1): 3.32, ("off-qk_norm", 0): float("nan"), ("off-qk_norm", 1): 3.4}
    monkeypatch.setattr(ablate, "launch_train", FakeTrain(losses))
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 2,
                    "--out", tmp_path / "o") == 1
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["runs"][1]["status"] == "diverged" and summary["runs"][1]["final_val_loss"] is None
    assert summary["arms"][1]["n"] == 1 and summary["arms"][1]["losses"] == [3.4]
    assert summary["notes"] == ["off-qk_norm seed 0 diverged: final val loss is nan"]
    assert "| off-qk_norm | model.qk_norm | 1 (1 not finished) | 3.4000 |" in (tmp_path / "o" / "summary.md").read_text()


def test_a_stopped_run_is_run_again_from_a_clean_directory(tmp_path, monkeypatch):
    fake = FakeTrain({("base", 0): 3.3, ("off-qk_norm", 0): 3.4})
    monkeypatch.setattr(ablate, "launch_train", fake)
    stopped = tmp_path / "o" / "base" / "seed0"
    stopped.mkdir(parents=True)
    spec = ablate.Spec("tiny-2025", (("model.qk_norm",),))
    ablate.write_json(tmp_path / "o" / ablate.SPEC_FILE, {"spec": spec.to_json()})
    (stopped / "summary.json").write_text(json.dumps({"status": "interrupted", "step": 3}))
    (stopped / "log.txt").write_text("old\n")
    folder, summary = ablate.run_ablation(spec, 1, str(tmp_path / "o"))
    assert [(a, s) for a, s, _ in fake.calls] == [("base", 0), ("off-qk_norm", 0)]
    assert not (stopped / "log.txt").exists() and summary["runs"][0]["status"] == "finished"


def test_another_spec_in_the_out_folder_is_refused(tmp_path, monkeypatch, capsys):
    fake = FakeTrain({(a, 0): 3.3 for a in ("base", "off-qk_norm", "off-x0_mix")})
    monkeypatch.setattr(ablate, "launch_train", fake)
    out = tmp_path / "o"
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1, "--out", out) == 0
    before = sorted(str(p) for p in out.rglob("*"))
    fake.calls.clear()
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "x0_mix", "--seeds", 1, "--out", out) == 2
    err = capsys.readouterr().err
    assert "holds an ablation of another spec (variants: [[\"model.qk_norm\"]] there, [[\"model.x0_mix\"]] now)" in err
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--steps", 5, "--seeds", 1,
                    "--out", out) == 2
    assert "steps: null there, 5 now" in capsys.readouterr().err
    assert fake.calls == [] and sorted(str(p) for p in out.rglob("*")) == before


def test_a_finished_run_of_a_changed_config_is_not_mixed_in(tmp_path, monkeypatch, capsys):
    fake = FakeTrain({("base", 0): 3.3, ("off-qk_norm", 0): 3.4})
    monkeypatch.setattr(ablate, "launch_train", fake)
    out = tmp_path / "o"
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1, "--out", out) == 0
    config = out / "base" / "seed0" / "config.toml"
    config.write_text(config.read_text().replace("n_layer = 6", "n_layer = 5").replace('"LSSSSL"', '"LSSSL"'))
    assert speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1, "--out", out) == 2
    assert "finished with another config than its arm's now (model.n_layer = 6 vs 5)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# one real ablation


def _git_commit() -> str | None:
    where = Path(ablate.__file__).parent
    tracked = subprocess.run(["git", "-C", str(where), "ls-files", "--error-unmatch", "__init__.py"], capture_output=True)
    if tracked.returncode:
        return None
    return subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow  # two `speedrun train` processes: ~15 s on 2 cores
def test_a_real_two_arm_ablation_trains_both_and_compare_reads_them(tmp_path, monkeypatch, capsys):
    # tiny at its smallest: 4 layers, 2 steps of 256 tokens, one validation of 256 tokens
    small = [*SMALL_RUN[:-1], "--set", "data.batch_tokens=256", "--set", "data.val_tokens=256", "--set",
             "data.val_seq_len=128", "--set", "train.val_every=0", "--set", "train.warmup_steps_untimed=0",
             "--set", "model.n_layer=4", "--set", 'model.long_short_pattern="LSSL"']
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = speedrun(monkeypatch, "ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1, "--steps", 2,
                    "--device", "cpu", "--no-compile", "--out", "abl", *small)
    assert time.perf_counter() - start < 60
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((tmp_path / "abl" / "summary.json").read_text())
    runs = analysis.load_runs([tmp_path / "abl" / "base" / "seed0", tmp_path / "abl" / "off-qk_norm" / "seed0"])
    assert [r.config["model"]["qk_norm"] for r in runs] == [True, False]
    assert [r.config["train"]["seed"] for r in runs] == [0, 0] and [r.config["train"]["steps"] for r in runs] == [2, 2]
    assert analysis.config_difference(*runs) == "model.qk_norm = true vs false"
    assert [r["final_val_loss"] for r in summary["runs"]] == [r.summary["final_val_loss"] for r in runs]
    assert all(math.isfinite(r["final_val_loss"]) and r["status"] == "finished" for r in summary["runs"])
    assert summary["arms"][1]["delta"] == pytest.approx(runs[1].summary["final_val_loss"] - runs[0].summary["final_val_loss"])
    for r in summary["runs"]:
        assert r["device"].startswith("CPU") and r["torch"] == __import__("torch").__version__
        assert r["commit"] == _git_commit()
    assert [row["status"] for row in analysis.compare_rows(runs, None)] == ["finished", "finished"]
    assert (tmp_path / "abl" / "base" / "seed0" / ablate.OUTPUT_FILE).read_text().count("final val_loss") == 1


@pytest.mark.filterwarnings("ignore:Precision loss")  # the reference's scipy call on an arm of equal losses
def test_welch_p_needs_two_runs_a_side_and_some_variance():
    assert ablate.welch_p([3.4], [3.3, 3.31]) is None and ablate.welch_p([3.4, 3.41], [3.3]) is None
    assert ablate.welch_p([3.4, 3.4], [3.3, 3.3]) is None  # no variance anywhere: nothing to test against
    assert ablate.welch_p([3.4, 3.4], [3.3, 3.31]) == pytest.approx(
        stats.ttest_ind([3.4, 3.4], [3.3, 3.31], equal_var=False, alternative="greater").pvalue, rel=1e-12)


def test_ctrl_c_stops_the_ablation_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    fake = FakeTrain({("base", 0): 3.3, ("off-qk_norm", 0): 3.4})

    def interrupted(argv, folder):
        if folder.parent.name == "off-qk_norm":
            raise KeyboardInterrupt
        return fake(argv, folder)

    monkeypatch.setattr(ablate, "launch_train", interrupted)
    argv = ["ablate", "--preset", "tiny-2025", "--off", "qk_norm", "--seeds", 1, "--out", tmp_path / "o"]
    assert speedrun(monkeypatch, *argv) == 130
    assert f"to continue where this stopped: speedrun ablate --preset tiny-2025 --off model.qk_norm --seeds 1 --out {tmp_path / 'o'}" \
        in capsys.readouterr().out
    assert not (tmp_path / "o" / "summary.json").exists()
    monkeypatch.setattr(ablate, "launch_train", fake)
    assert speedrun(monkeypatch, *argv) == 0
    assert [(a, s) for a, s, _ in fake.calls] == [("base", 0), ("off-qk_norm", 0)]
