"""`speedrun ablate`: what each technique of a preset is worth. The preset (the base arm) and one
variant per `--off` (the preset with those config keys back at their defaults, which are the plain
GPT-2's, so "off") each train on the same seeds; a table then compares every variant's final
val loss with the base's.

Each run is a plain `speedrun train` in a child process with its own run directory
(OUT/ARM/seedS), so `speedrun plot`, `compare` and `record` read them as any other run, and a run
that crashes its process (a segfault, the OOM killer, a poisoned CUDA context) takes no other
run's results with it. OUT/ablation.json holds the spec; the same command again finishes an
unfinished ablation, and more `--seeds` add runs to a finished one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speedrun import analysis, rundir
from speedrun.checkpoint import write_json
from speedrun.config import COMPILE_HELP, SECTIONS, Config, load_config, to_dict
from speedrun.errors import DataError, UsageError

SPEC_FILE = "ablation.json"
LAUNCH_FILE = "launch.json"  # in each run directory: the exact train command, the commit, the exit code
OUTPUT_FILE = "train-output.txt"  # in each run directory: what the child process printed
DASH = analysis.DASH

# Keys an ablation cannot switch off, and why.
_VAL_SET = "it changes the val set, so the arms' losses would not compare"
REFUSED = {
    **{key: "it changes how a run is executed or logged, not what it computes" for key in analysis.SETUP_ONLY_KEYS},
    "train.seed": "ablate gives every arm the same seeds itself (--seeds)",
    "train.steps": "give the run length with --steps",
    "train.warmup_steps_untimed": "it changes how a run is executed, not what it computes",
    "train.target_val_loss": "it is a goal, not part of the run",
    "data.dir": _VAL_SET, "data.val_pattern": _VAL_SET, "data.val_tokens": _VAL_SET, "data.val_seq_len": _VAL_SET,
}


# ---------------------------------------------------------------------------------------------
# switches


def config_keys() -> list[str]:
    """Every config key as section.key, in config order."""
    cfg = Config()
    return [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(cfg, section))]


def default_of(key: str):
    section, name = key.split(".")
    return getattr(getattr(Config(), section), name)


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _close_matches(name: str, keys: list[str]) -> list[str]:
    if "." in name:
        return difflib.get_close_matches(name, keys, n=5)
    bare = difflib.get_close_matches(name, sorted({k.split(".")[1] for k in keys}), n=5)
    return [k for b in bare for k in keys if k.split(".")[1] == b]


def resolve_switch(name: str) -> str:
    """`section.key`, or a bare `key` that exactly one section has, as section.key; anything else
    is a UsageError naming the close matches."""
    keys = config_keys()
    found = [name] if name in keys else [k for k in keys if "." not in name and k.split(".")[1] == name]
    if len(found) > 1:
        raise UsageError(f"--off {name}: ambiguous, it names {' and '.join(found)}; give one of them")
    if not found:
        close = _close_matches(name, keys)
        hint = f"close matches: {', '.join(close)}" if close else "keys are section.key, e.g. model.qk_norm"
        raise UsageError(f"--off {name}: no such config key ({hint})")
    if found[0] in REFUSED:
        raise UsageError(f"--off {found[0]}: cannot be ablated: {REFUSED[found[0]]}")
    return found[0]


def parse_variants(texts: list[str]) -> tuple[tuple[str, ...], ...]:
    """Each `--off A,B` as one variant's keys, resolved; a key twice in a variant, or two variants
    of the same keys, is refused."""
    variants: list[tuple[str, ...]] = []
    for text in texts:
        names = [n.strip() for n in text.split(",")]
        if not all(names):
            raise UsageError(f"--off '{text}': expected KEY or KEY,KEY,... (an empty name)")
        keys = tuple(resolve_switch(n) for n in names)
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UsageError(f"--off '{text}' names {twice[0]} twice")
        if any(set(v) == set(keys) for v in variants):
            raise UsageError(f"--off '{text}' is given twice; each variant runs once")
        variants.append(keys)
    return tuple(variants)


def _short(key: str) -> str:
    """A key as its bare name where that names it alone."""
    bare = key.split(".")[1]
    return bare if sum(k.split(".")[1] == bare for k in config_keys()) == 1 else key


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Spec:
    """What an ablation runs, apart from how many seeds: the same spec makes the same runs, so a
    second call can finish a first's, or add seeds to it."""
    preset: str
    variants: tuple[tuple[str, ...], ...]  # each variant's keys, section.key
    steps: int | None = None
    sets: tuple[str, ...] = ()  # --set overrides every arm shares, before its switches
    data: str | None = None
    device: str | None = None
    compile: bool | None = None

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back


@dataclass(frozen=True)
class Arm:
    name: str  # its directory under the ablation's folder
    off: tuple[str, ...]  # keys set to their defaults; none for the base


def arms(spec: Spec) -> list[Arm]:
    return [Arm("base", ()), *(Arm("off-" + "+".join(map(_short, keys)), keys) for keys in spec.variants)]


def schedule(arm_list: list[Arm], seeds: int) -> list[tuple[Arm, int]]:
    """Every arm's run of seed 0, then every arm's of seed 1, ...: drift of the machine over the
    ablation (thermals, other jobs) falls on all arms alike instead of on the arms run last."""
    return [(arm, seed) for seed in range(seeds) for arm in arm_list]


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.name / f"seed{seed}"


def switch_overrides(arm: Arm) -> list[str]:
    # JSON writes every default as a TOML value --set reads back to it (tests check each key)
    return [f"{key}={json.dumps(default_of(key))}" for key in arm.off]


def _run_flags(spec: Spec) -> list[str]:
    """The flags every run passes on to `speedrun train` as given."""
    argv = []
    for flag, value in (("--steps", spec.steps), ("--data", spec.data), ("--device", spec.device)):
        if value is not None:
            argv += [flag, str(value)]
    if spec.compile is not None:
        argv.append("--compile" if spec.compile else "--no-compile")
    return argv


def train_argv(spec: Spec, arm: Arm, seed: int, folder: Path | None) -> list[str]:
    """The `speedrun train` arguments of one run."""
    argv = ["--preset", spec.preset]
    for text in [*spec.sets, *switch_overrides(arm)]:
        argv += ["--set", text]
    argv += ["--seed", str(seed), *_run_flags(spec)]
    return argv + (["--out", str(folder)] if folder is not None else [])


def run_config(argv: list[str]) -> Config:
    """The config `speedrun train ARGV` trains: its own parser and resolution, so the two cannot
    drift apart (--steps scales the schedules as it does there)."""
    from speedrun import train

    parser = argparse.ArgumentParser(prog="speedrun")
    train.register(parser.add_subparsers(dest="command"))
    return train.resolve_config(parser.parse_args(["train", *argv]))


def check_spec(spec: Spec) -> dict[str, Config]:
    """Every arm's config (at seed 0), or a UsageError before anything is written or run: a switch
    the base already has off, a switch --set also sets, a variant that is not a valid config."""
    set_keys = {text.split("=", 1)[0].strip() for text in spec.sets}
    if "train.seed" in set_keys:
        raise UsageError("--set train.seed: ablate gives every arm the same seeds itself (--seeds)")
    base = load_config(spec.preset, None, list(spec.sets))  # before --steps scales step counts
    for keys in spec.variants:
        for key in keys:
            if key in set_keys:
                raise UsageError(f"--off {key} and --set {key} both set it; leave one out")
            if _value(base, key) == default_of(key):
                raise UsageError(f"--off {key}: already {json.dumps(default_of(key))} (its default, off) in preset "
                                 f"{spec.preset}; that variant would equal the base")
    configs = {}
    for arm in arms(spec):
        try:
            configs[arm.name] = run_config(train_argv(spec, arm, 0, None))
        except UsageError as e:
            raise UsageError(f"{arm.name}: {e}" if arm.off else str(e)) from None
    return configs


# ---------------------------------------------------------------------------------------------
# the ablation's folder


def _spec_difference(saved: dict, now: dict) -> str:
    key = next((k for k in now if saved.get(k) != now[k]), None)
    return f"{key}: {json.dumps(saved.get(key))} there, {json.dumps(now[key])} now" if key else "unreadable spec"


def _read_saved_spec(folder: Path) -> dict | None:
    path = folder / SPEC_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--out {folder}: {SPEC_FILE} is not readable JSON; choose another --out") from None
    return saved.get("spec") if isinstance(saved, dict) else None


def _check_finished_configs(folder: Path, spec: Spec, configs: dict[str, Config]) -> None:
    """A finished run is kept only if it trained this arm's config: a changed preset or default
    would otherwise mix two configs in one arm."""
    for arm in arms(spec):
        for path in sorted((folder / arm.name).glob("seed*")):
            if not _finished(path):
                continue
            expected = analysis.Run(path, arm.name, to_dict(configs[arm.name]), [], None)
            diff = analysis.config_difference(expected, analysis.load_run(path))
            if diff is not None:
                raise UsageError(f"{path} finished with another config than its arm's now ({diff}): the preset or "
                                 "the code changed since; start a new --out")


def prepare_out(out: str | None, spec: Spec, configs: dict[str, Config]) -> tuple[Path, bool]:
    """The ablation's folder and whether it continues an earlier call: a new one (default
    runs/ablate-PRESET/<timestamp>), an empty one, or one holding an ablation of this spec."""
    if out is None:
        folder = rundir.new_default(Path("runs") / f"ablate-{spec.preset}")
    else:
        folder = rundir.check_folder(out)
        if folder.is_dir() and any(folder.iterdir()):
            saved = _read_saved_spec(folder)
            if saved is None:
                raise UsageError(f"--out {folder} is not empty and holds no ablation ({SPEC_FILE}); choose a new "
                                 "or empty folder")
            if saved != spec.to_json():
                difference = _spec_difference(saved, spec.to_json())
                raise UsageError(f"--out {folder} holds an ablation of another spec ({difference}); rerun that "
                                 "ablation's command to finish it, or choose another --out")
            _check_finished_configs(folder, spec, configs)
            return folder, True
        rundir.make_folder(folder)
    write_json(folder / SPEC_FILE, {"spec": spec.to_json(), "created": _now()})
    return folder, False


# ---------------------------------------------------------------------------------------------
# running


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def code_version() -> dict:
    """The git commit of the speedrun source that runs, and whether the package's files differ from
    it (new files included); None for both where the package is not tracked by git (an installed copy)."""
    where = Path(__file__).resolve().parent
    git = lambda *args: subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
    try:
        tracked = git("ls-files", "--error-unmatch", "__init__.py").returncode == 0
        commit = git("rev-parse", "HEAD") if tracked else None
        status = git("status", "--porcelain", "--", ".") if tracked else None
    except (OSError, subprocess.TimeoutExpired):
        tracked = False
    if not tracked or commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def launch_train(argv: list[str], folder: Path) -> int:
    """`speedrun train ARGV` in a child process, its output into FOLDER/train-output.txt; returns
    its exit code. On Ctrl-C the child, which got the same signal, is given time to record that
    it was interrupted."""
    with open(folder / OUTPUT_FILE, "w") as output:
        child = subprocess.Popen([sys.executable, "-m", "speedrun", "train", *argv], stdout=output,
                                 stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except KeyboardInterrupt:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text()).get("status", "finished") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _last_output_line(folder: Path) -> str:
    try:
        lines = [line.strip() for line in (folder / OUTPUT_FILE).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def read_result(arm: Arm, seed: int, folder: Path) -> dict:
    """One run as the summary lists it: status (finished, failed, interrupted, diverged: a final
    loss that is not finite), loss, train time and the fingerprint of what ran it."""
    launch = _read_json(folder / LAUNCH_FILE)
    result = {"arm": arm.name, "seed": seed, "dir": str(folder), "status": "failed", "final_val_loss": None,
              "train_time_s": None, "error": None, "device": None, "torch": None, "cuda": None,
              "commit": launch.get("commit"), "dirty": launch.get("dirty")}
    try:
        run = analysis.load_run(folder)
    except DataError as e:
        code = launch.get("exit_code")
        result["error"] = _last_output_line(folder) or (f"exit code {code}" if code is not None else str(e))
        return result
    path = run.summary.get("path") or {}
    result.update(device=path.get("device"), torch=path.get("torch"), cuda=path.get("cuda"))
    if run.stopped is not None:
        return {**result, "status": run.status, "error": run.stopped}
    loss = float(run.summary["final_val_loss"])
    result.update(final_val_loss=loss, train_time_s=run.summary["train_time_ms"] / 1000, status="finished")
    if not math.isfinite(loss):
        result.update(status="diverged", error=f"final val loss is {loss}")
    return result


def _describe(result: dict) -> str:
    if result["status"] == "finished":
        return f"val loss {result['final_val_loss']:.4f}, train time {result['train_time_s']:.1f} s"
    reason = result["error"] or result["status"]
    return f"{result['status']}: {reason} (output: {Path(result['dir']) / OUTPUT_FILE})"


def run_one(spec: Spec, arm: Arm, seed: int, folder: Path, launch: Callable[[list[str], Path], int], tag: str) -> None:
    """One run, unless an earlier call finished it; a run that stopped or crashed is run again
    from the start, its old results deleted first."""
    if _finished(folder):
        print(f"{tag} {arm.name} seed {seed}: finished earlier, {_describe(read_result(arm, seed, folder))}", flush=True)
        return
    rundir.prepare(str(folder), None, overwrite=True)
    rundir.release()  # the run claims its folder itself
    argv = train_argv(spec, arm, seed, folder)
    record = {"command": ["speedrun", "train", *argv], **code_version(), "started": _now()}
    write_json(folder / LAUNCH_FILE, record)
    print(f"{tag} {arm.name} seed {seed}: started", flush=True)
    code = launch(argv, folder)
    write_json(folder / LAUNCH_FILE, {**record, "finished": _now(), "exit_code": code})
    print(f"{tag} {arm.name} seed {seed}: {_describe(read_result(arm, seed, folder))}", flush=True)


# ---------------------------------------------------------------------------------------------
# statistics and the summary


def welch_p(variant: list[float], base: list[float]) -> float | None:
    """One-sided Welch t-test p-value that the variant's mean loss is above the base's; None with
    fewer than two runs in either arm, or no variance in both (a t-test then says nothing)."""
    from scipy import stats

    if len(variant) < 2 or len(base) < 2 or (len(set(variant)) == 1 and len(set(base)) == 1):
        return None
    with warnings.catch_warnings():  # one arm of equal losses: scipy warns of precision, the p-value is sound
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(variant, base, equal_var=False, alternative="greater").pvalue)
    return p if math.isfinite(p) else None


def arm_rows(arm_list: list[Arm], results: list[dict]) -> list[dict]:
    """Per arm: n finished runs, their losses' mean and sample std, mean train time, and the
    difference from the base's mean with its p-value."""
    import numpy as np

    rows = []
    for arm in arm_list:
        mine = [r for r in results if r["arm"] == arm.name]
        done = [r for r in mine if r["status"] == "finished"]
        losses = np.array([r["final_val_loss"] for r in done], dtype=np.float64)
        times = np.array([r["train_time_s"] for r in done], dtype=np.float64)
        rows.append({"arm": arm.name, "off": list(arm.off), "n": len(done), "not_finished": len(mine) - len(done),
                     "losses": losses.tolist(), "loss_mean": float(losses.mean()) if len(done) else None,
                     "loss_std": float(losses.std(ddof=1)) if len(done) > 1 else None,
                     "time_mean_s": float(times.mean()) if len(done) else None})
    base = rows[0]
    for row in rows[1:]:
        both = row["loss_mean"] is not None and base["loss_mean"] is not None
        row["delta"] = row["loss_mean"] - base["loss_mean"] if both else None
        row["p"] = welch_p(row["losses"], base["losses"])
    return rows


TABLE_HEADER = ["arm", "switches off", "n", "val loss (mean ± std)", "train time (s)", "Δ vs base", "p (worse)"]


def table_cells(row: dict) -> list[str]:
    is_base = not row["off"]
    fmt = lambda value, spec: DASH if value is None else format(value, spec)
    loss = fmt(row["loss_mean"], ".4f") + (f" ± {row['loss_std']:.4f}" if row["loss_std"] is not None else "")
    n = str(row["n"]) + (f" ({row['not_finished']} not finished)" if row["not_finished"] else "")
    delta = DASH if is_base else fmt(row["delta"], "+.4f")
    p = DASH if is_base else fmt(row["p"], ".3g") if row["p"] is not None else "n/a"
    return [row["arm"], ", ".join(row["off"]) or DASH, n, loss, fmt(row["time_mean_s"], ".1f"), delta, p]


def command_line(spec: Spec, seeds: int, out: Path) -> str:
    """The `speedrun ablate` command that makes (or finishes) this ablation."""
    args = ["speedrun", "ablate", "--preset", spec.preset]
    for keys in spec.variants:
        args += ["--off", ",".join(keys)]
    args += ["--seeds", str(seeds)]
    for text in spec.sets:
        args += ["--set", text]
    return shlex.join([*args, *_run_flags(spec), "--out", str(out)])


def summarize(spec: Spec, seeds: int, out: Path, results: list[dict]) -> dict:
    """What summary.json holds: the spec, per-arm statistics, every run's result, and notes on runs
    that did not finish and on runs that differ in device, torch or commit."""
    rows = arm_rows(arms(spec), results)
    notes = [f"{r['arm']} seed {r['seed']} {r['status']}: {r['error']}" for r in results if r["status"] != "finished"]
    for field in ("device", "torch", "commit"):
        seen = sorted({str(r[field]) for r in results if r["status"] == "finished"})
        if len(seen) > 1:
            notes.append(f"the runs differ in {field}: {', '.join(seen)}")
    return {"spec": spec.to_json(), "seeds": seeds, "command": command_line(spec, seeds, out), "date": _now(),
            "test": "one-sided Welch t-test that the arm's mean final val loss is above the base's (scipy "
                    "ttest_ind, equal_var=False, alternative='greater'); n/a below 2 runs in either arm",
            "arms": rows, "runs": results, "notes": notes}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda text: text.replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def summary_markdown(summary: dict) -> str:
    run_header = ["arm", "seed", "status", "final val loss", "train time (s)", "device", "torch", "commit",
                  "run directory"]
    run_rows = []
    for r in summary["runs"]:
        commit = (r["commit"] or "unknown")[:12] + (" (uncommitted changes)" if r["dirty"] else "")
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else DASH
        time_s = f"{r['train_time_s']:.1f}" if r["train_time_s"] is not None else DASH
        run_rows.append([r["arm"], str(r["seed"]), r["status"], loss, time_s, r["device"] or DASH, r["torch"] or DASH,
                         commit, r["dir"]])
    parts = [f"# speedrun ablate: {summary['spec']['preset']}", "",
             f"- command: `{summary['command']}`", f"- date: {summary['date']}",
             f"- seeds 0..{summary['seeds'] - 1}, the same in every arm; p: {summary['test']}", "",
             markdown_table(TABLE_HEADER, [table_cells(row) for row in summary["arms"]]), "",
             *(f"- note: {n}" for n in summary["notes"]), *([""] if summary["notes"] else []),
             "## Runs", "", markdown_table(run_header, run_rows)]
    return "\n".join(parts) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    write_json(out / "summary.json", analysis._json_safe(summary))
    (out / "summary.md").write_text(summary_markdown(summary))


# ---------------------------------------------------------------------------------------------
# the command


def run_ablation(spec: Spec, seeds: int, out: str | None,
                 launch: Callable[[list[str], Path], int] | None = None) -> tuple[Path, dict]:
    """Check everything, then train every arm on seeds 0..seeds-1, interleaved, and write the
    summary; returns the folder and the summary. `launch(argv, run_dir) -> exit code` runs one
    `speedrun train` (a child process unless given)."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    configs = check_spec(spec)
    folder, resumed = prepare_out(out, spec, configs)
    plan = schedule(arms(spec), seeds)
    print(f"ablate {spec.preset}: {len(spec.variants) + 1} arms × {seeds} seeds = {len(plan)} runs in {folder}",
          flush=True)
    if resumed:
        done = sum(_finished(run_dir(folder, arm, seed)) for arm, seed in plan)
        print(f"continuing the ablation there: {done} of {len(plan)} runs finished earlier", flush=True)
    try:
        for i, (arm, seed) in enumerate(plan, 1):
            run_one(spec, arm, seed, run_dir(folder, arm, seed), launch or launch_train, f"[{i}/{len(plan)}]")
    except KeyboardInterrupt:
        print(f"to continue where this stopped: {command_line(spec, seeds, folder)}", flush=True)
        raise
    summary = summarize(spec, seeds, folder, [read_result(arm, seed, run_dir(folder, arm, seed)) for arm, seed in plan])
    write_summary(folder, summary)
    return folder, summary


def _cmd_ablate(args: argparse.Namespace) -> int:
    spec = Spec(preset=args.preset, variants=parse_variants(args.off), steps=args.steps, sets=tuple(args.set or ()),
                data=args.data, device=args.device, compile=args.compile)
    folder, summary = run_ablation(spec, args.seeds, args.out)
    print()
    print(analysis._table(TABLE_HEADER, [table_cells(row) for row in summary["arms"]], right={2, 3, 4, 5, 6}))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"summary: {folder / 'summary.md'} and summary.json; runs: {folder}/ARM/seedS "
          f"(e.g. speedrun compare {' '.join(str(run_dir(folder, arm, 0)) for arm in arms(spec))})")
    return 0 if all(r["status"] == "finished" for r in summary["runs"]) else 1


DESCRIPTION = """\
Train the preset (the base) and, per --off, a variant with those config keys back at
their defaults (the defaults are the plain GPT-2 with every technique off), each arm on
seeds 0..N-1, interleaved: base s0, variant 1 s0, ..., base s1, ... An unknown or
ambiguous key, or one the preset already has at its default, is refused before anything
runs. Each run is a `speedrun train` in its own process and run directory OUT/ARM/seedS.

Prints and writes OUT/summary.md and OUT/summary.json: per arm n, mean ± std final val
loss, mean train time, the difference from the base's mean loss, and the one-sided Welch
t-test p-value that the variant's loss is higher (n/a below 2 seeds). The same command
with the same --out continues an unfinished ablation; a larger --seeds adds seeds to it."""


def register(sub) -> None:
    p = sub.add_parser("ablate", help="train a preset and variants with techniques switched off, on the same seeds, "
                                      "and compare", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="the base (see `speedrun presets`)")
    p.add_argument("--off", action="append", required=True, metavar="KEY[,KEY...]",
                   help="one variant: these keys (section.key, or a key only one section has) set to their defaults; "
                        "repeat for more variants")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="runs per arm, seeds 0..N-1 (default: 3)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="optimizer steps per run; every schedule is scaled as `train --steps` does")
    p.add_argument("--out", metavar="DIR", help="the ablation's folder (default: runs/ablate-PRESET/<timestamp>); "
                                                "must be new, empty, or an ablation of the same spec to continue")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every arm (repeatable)")
    p.add_argument("--data", metavar="DIR", help="directory of .bin shards for every run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=COMPILE_HELP)
    p.set_defaults(func=_cmd_ablate)
