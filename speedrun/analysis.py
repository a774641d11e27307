"""Reading finished run directories: `speedrun plot`, `speedrun compare` and `speedrun record`.

A run directory (written by `speedrun train --out DIR`) holds config.toml, metrics.jsonl and
summary.json; a run's name is the directory's basename."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from speedrun.config import from_dict, to_dict
from speedrun.errors import DataError, UsageError
from speedrun.rundir import make_folder

# Keys that change how a run is executed or logged but not what it computes; runs that differ only
# here count as repeats of one config. The description is prose, not a hyperparameter.
SETUP_ONLY_KEYS = {"description", "train.seed", "train.device", "train.compile", "train.save_every", "train.keep",
                   "train.val_every", "train.log_every"}
SUMMARY_KEYS = ("final_val_loss", "train_time_ms", "tokens")
STOPPED = ("failed", "interrupted")  # summary.json statuses of runs that ended early
DASH = "—"


@dataclass
class Run:
    path: Path
    name: str
    config: dict  # config.toml, resolved (config.to_dict)
    metrics: list[dict]
    summary: dict | None  # None while the run is still going (plot reads such runs)
    val: list[dict] = field(init=False)
    train: list[dict] = field(init=False)

    def __post_init__(self):
        self.val = [r for r in self.metrics if "val_loss" in r]
        self.train = [r for r in self.metrics if "train_loss" in r]

    @property
    def target(self) -> float:
        value = self.config.get("train", {}).get("target_val_loss", 0.0)
        return float(value) if isinstance(value, (int, float)) else 0.0

    @property
    def label(self) -> str:
        return str((self.summary or {}).get("config", "")) or "custom"

    @property
    def status(self) -> str:
        """finished, failed or interrupted (as summary.json says), or running (no summary yet)."""
        return str(self.summary.get("status", "finished")) if self.summary is not None else "running"

    @property
    def stopped(self) -> str | None:
        """For a run that ended early, e.g. "failed at step 12: training loss became nan"."""
        if self.status not in STOPPED:
            return None
        return f"{self.status} at step {self.summary.get('step', '?')}: {self.summary.get('error', '')}".rstrip(": ")


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a run directory written by `speedrun train --out`?)") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_metrics(path: Path, need_val: bool = True) -> list[dict]:
    text = _read_text(path) if need_val or path.exists() else ""
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, a number too long to convert, deep nesting
            if i == len(lines) and not text.endswith("\n"):
                break  # a live run's line still being written
            raise DataError(f"{path}: line {i} is not JSON") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i} is not a JSON object")
        for key in ("step", "tokens", "train_time_ms", "val_loss", "train_loss"):
            if (key in rec or key in ("step", "tokens", "train_time_ms")) and not _is_number(rec.get(key)):
                raise DataError(f"{path}: line {i} has no number '{key}'")
        records.append(rec)
    if need_val and not any("val_loss" in r for r in records):
        raise DataError(f"{path}: no validation records")
    return records


def _read_config(path: Path) -> dict:
    """The run's config resolved in the current version's keys, so that runs saved by older
    versions compare with newer ones key for key."""
    try:
        table = tomllib.loads(_read_text(path))
    except (ValueError, RecursionError) as e:  # TOMLDecodeError is a ValueError
        raise DataError(f"{path}: not valid TOML ({str(e)[:200]})") from None
    return to_dict(from_dict(table, str(path)))


def load_run(path: str | Path, need_summary: bool = True) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run directory")
    config = _read_config(path / "config.toml")
    summary = None
    summary_path = path / "summary.json"
    if need_summary or summary_path.exists():
        try:
            summary = json.loads(_read_text(summary_path))
        except (ValueError, RecursionError):
            raise DataError(f"{summary_path}: not valid JSON") from None
        if not isinstance(summary, dict):
            raise DataError(f"{summary_path}: not a JSON object")
    stopped = summary is not None and summary.get("status") in STOPPED
    # a run that failed or was interrupted may have stopped before its first validation
    metrics = _read_metrics(path / "metrics.jsonl", need_val=not stopped)
    for key in SUMMARY_KEYS if summary is not None and not stopped else ():
        if not isinstance(summary.get(key), (int, float)):
            raise DataError(f"{summary_path}: no number '{key}' (the run may not have finished)")
    return Run(path, path.resolve().name, config, metrics, summary)


def load_runs(paths, need_summary: bool = True) -> list[Run]:
    runs = [load_run(p, need_summary) for p in paths]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:  # runs/a/seed0 and runs/b/seed0: the basename alone is ambiguous
            r.name = str(r.path)
    return runs


# ---------------------------------------------------------------------------------------------
# numbers


def time_to_loss(run: Run, loss: float) -> float | None:
    """Train time (ms) at which val loss first reaches `loss`, linear between the two val records
    around the crossing; None if it never does."""
    prev = None
    for rec in run.val:
        if rec["val_loss"] <= loss:
            if prev is None:
                return float(rec["train_time_ms"])
            frac = (prev["val_loss"] - loss) / (prev["val_loss"] - rec["val_loss"])
            return prev["train_time_ms"] + frac * (rec["train_time_ms"] - prev["train_time_ms"])
        prev = rec
    return None


def _mfu(run: Run) -> float | None:
    # Each train record's mfu is an average since the start, so the last one covers the whole run.
    return next((r["mfu"] for r in reversed(run.train) if "mfu" in r), None)


def compare_rows(runs: list[Run], loss: float | None) -> list[dict]:
    """A row per run; a run that ended early gets its status and no figures."""
    base = next((r.summary["train_time_ms"] for r in runs if r.stopped is None), 0)
    rows = []
    for r in runs:
        if r.stopped is not None:
            rows.append({"run": r.name, "path": str(r.path), "config": r.label, "status": r.stopped})
            continue
        s = r.summary
        time_ms = s["train_time_ms"]
        rows.append({
            "run": r.name, "path": str(r.path), "config": r.label,
            "final_val_loss": s["final_val_loss"], "train_time_ms": time_ms, "tokens": s["tokens"],
            "tokens_per_s": s["tokens"] / (time_ms / 1000) if time_ms > 0 else None,
            "mfu": _mfu(r),
            "time_to_loss_ms": time_to_loss(r, loss) if loss is not None else None,
            "time_ratio": time_ms / base if base > 0 else None, "status": "finished",
        })
    return rows


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(a: Run, b: Run) -> str | None:
    """The first key (in config order) where two runs' configs differ, ignoring SETUP_ONLY_KEYS."""
    fa, fb = _flatten(a.config), _flatten(b.config)
    for key in list(fa) + [k for k in fb if k not in fa]:
        if key in SETUP_ONLY_KEYS:
            continue
        if key not in fa or key not in fb or fa[key] != fb[key]:
            show = lambda f: json.dumps(f[key]) if key in f else "(absent)"
            return f"{key} = {show(fa)} vs {show(fb)}"
    return None


def _val_set(run: Run):
    return run.summary.get("val_set")


def _describe_val_set(v) -> str:
    if not isinstance(v, dict):
        return "an unrecorded val set"
    return f"sha256 {str(v.get('sha256', '?'))[:12]}… on {v.get('tokens', '?')} tokens"


def check_same_setup(runs: list[Run]) -> None:
    first = runs[0]
    for r in runs[1:]:
        diff = config_difference(first, r)
        if diff is not None:
            raise UsageError(f"runs {first.name} and {r.name} have different configs ({diff}); "
                             "a record needs repeats of one config")
        if _val_set(first) != _val_set(r):
            raise UsageError(f"runs {first.name} and {r.name} were validated on different val sets "
                             f"({_describe_val_set(_val_set(first))} vs {_describe_val_set(_val_set(r))})")


def check_independent(runs: list[Run]) -> None:
    """A t-test over repeats needs independent repeats: the same run directory twice, or two runs
    of one seed (the same run again, whatever nondeterminism adds), is one piece of evidence."""
    seen: dict = {}
    for r in runs:
        if r.path.resolve() in seen:
            raise UsageError(f"run {r.path} is given twice ({seen[r.path.resolve()].name}); each run counts once")
        seen[r.path.resolve()] = r
    seeds: dict = {}
    for r in runs:
        seed = r.config.get("train", {}).get("seed")
        if seed in seeds:
            raise UsageError(f"runs {seeds[seed].name} and {r.name} have the same seed ({seed}): repeats of one seed "
                             "are not independent evidence; give each repeat its own --seed")
        seeds[seed] = r


def record_stats(runs: list[Run], target: float, alpha: float) -> dict:
    import numpy as np
    from scipy import stats

    if len(runs) < 2:
        raise UsageError(f"a record needs at least 2 runs for its t-test, got {len(runs)}")
    for r in runs:
        if r.stopped is not None:
            raise UsageError(f"run {r.name} {r.stopped}; a record counts finished runs only")
    check_same_setup(runs)
    check_independent(runs)
    for r in runs:
        if not math.isfinite(r.summary["final_val_loss"]):
            raise DataError(f"{r.path / 'summary.json'}: final val loss is {r.summary['final_val_loss']} (diverged run)")
    losses = np.array([r.summary["final_val_loss"] for r in runs], dtype=np.float64)
    if losses.std() == 0:
        raise UsageError(f"every run's final val loss is {losses[0]:.6g}: with zero variance a t-test says nothing; "
                         "check that the runs really differ in seed")
    times_s = np.array([r.summary["train_time_ms"] / 1000 for r in runs], dtype=np.float64)
    test = stats.ttest_1samp(losses, target, alternative="less")
    p = float(test.pvalue)
    significant = bool(p < alpha)
    verdict = f"record holds: p = {p:.4g} < {alpha:g}" if significant else f"not significant: p = {p:.4g} ≥ {alpha:g}"
    mtimes = [(r.path / "summary.json").stat().st_mtime for r in runs]
    date = datetime.date.fromtimestamp(max(mtimes)).isoformat()
    result = {
        "runs": [r.name for r in runs], "config": runs[0].label, "n": len(runs), "target": target, "alpha": alpha,
        "losses": losses.tolist(), "loss_mean": float(losses.mean()), "loss_std": float(losses.std(ddof=1)),
        "t": float(test.statistic), "df": len(runs) - 1, "p": p,
        "train_time_s": times_s.tolist(), "time_mean_s": float(times_s.mean()), "time_std_s": float(times_s.std(ddof=1)),
        "significant": significant, "verdict": verdict, "date": date,
    }
    result["markdown"] = (f"| {_fmt_duration(result['time_mean_s'])} | {result['loss_mean']:.4f} ± {result['loss_std']:.4f} "
                          f"| {len(runs)} | {p:.2g} | {date} | {result['config']} |")
    return result


# ---------------------------------------------------------------------------------------------
# formatting


def _fmt_duration(seconds: float) -> str:
    return f"{seconds / 60:.2f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _fmt_count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _time_unit(max_ms: float) -> tuple[float, str]:
    """Divisor from ms and the unit name: seconds for short runs, minutes beyond two."""
    return (60_000.0, "min") if max_ms >= 120_000 else (1000.0, "s")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _json_safe(obj):
    # json.dumps writes NaN, which strict JSON readers reject
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# plot


def smoothed(values: list[float]) -> list[float]:
    """An exponential moving average over about a tenth of the run (at least 1, at most 100 steps),
    bias-corrected so that it starts at the first value instead of at zero."""
    beta = 1 - 1 / min(max(len(values) / 10, 1.0), 100.0)
    out, mean = [], 0.0
    for i, v in enumerate(values, 1):
        mean = beta * mean + (1 - beta) * v
        out.append(mean / (1 - beta ** i) if beta else v)
    return out


def plot_runs(runs: list[Run], x: str = "time", targets=(), train: bool = True):
    """One figure: each run's val loss (points joined, labelled by run name) and with `train` its
    train loss (raw values faint, smoothed on top, same colour); horizontal lines at `targets`
    that fall near the curves. Returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    key, div, xlabel = _x_axis(runs, x)
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.add_subplot()
    late = []  # losses after the first fifth of each run: they set the top of the axis
    for r in runs:
        label = r.name if r.stopped is None else f"{r.name} ({r.stopped.split(':')[0]})"
        (line,) = ax.plot([v[key] / div for v in r.val], [v["val_loss"] for v in r.val], marker="o", markersize=3,
                          lw=1.6, label=label, gid="val")
        late += [v["val_loss"] for v in r.val if v["step"] >= 0.2 * r.val[-1]["step"]]
        if train and r.train:
            xs, ys = [t[key] / div for t in r.train], [t["train_loss"] for t in r.train]
            ax.plot(xs, ys, color=line.get_color(), lw=0.5, alpha=0.25, label="_nolegend_", gid="train_raw")
            ax.plot(xs, smoothed(ys), color=line.get_color(), lw=1.0, alpha=0.8, label="_nolegend_", gid="train")
            late += [y for t, y in zip(r.train, smoothed(ys)) if t["step"] >= 0.2 * r.train[-1]["step"]]
    _loss_axis(ax, [y for y in late if math.isfinite(y) and y > 0], targets)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token, log scale)")
    ax.set_title("validation loss (points)" + (" and train loss (smoothed; raw faint)" if train else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def _x_axis(runs: list[Run], x: str) -> tuple[str, float, str]:
    """(metrics key, divisor, axis label) for --x."""
    last = [r.metrics[-1] for r in runs if r.metrics]  # a run stopped before its first step has none
    if x == "time":
        div, unit = _time_unit(max([m["train_time_ms"] for m in last] or [0.0]))
        return "train_time_ms", div, f"training time ({'minutes' if unit == 'min' else 'seconds'})"
    if x == "tokens":
        most = max([m["tokens"] for m in last] or [0])
        div, word = next(((s, w) for s, w in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")) if most >= s),
                         (1.0, "count"))
        return "tokens", div, f"training tokens ({word})"
    if x == "step":
        return "step", 1.0, "optimizer step"
    raise UsageError(f"--x must be time, tokens or step, got '{x}'")


def _loss_axis(ax, late: list[float], targets) -> None:
    """A log axis from a little below the lowest late loss to a little above the highest: the first
    losses (~ln vocab) would squash the ends of the curves, where runs differ. A target within 10%
    below the curves is drawn and the axis stretched to it; a farther one would squash them too."""
    from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator

    if not late:
        return
    lo, hi = min(late), max(late)
    for t in targets:
        if lo / 1.1 <= t <= hi:
            ax.axhline(t, color="0.25", ls=":", lw=1.2, label=f"target {t:g}", gid="target")
            lo = min(lo, t)
    lo, hi = lo / 1.02, max(hi, lo * 1.05) * 1.03
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_yticks([t for t in MaxNLocator(nbins=8).tick_values(lo, hi) if lo <= t <= hi])
    ax.yaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _default_targets(runs: list[Run]) -> list[float]:
    return sorted({r.target for r in runs if r.target > 0})


def _cmd_plot(args) -> int:
    runs = load_runs(args.runs, need_summary=False)
    targets = ([args.target] if args.target > 0 else []) if args.target is not None else _default_targets(runs)
    print(save_figure(plot_runs(runs, x=args.x, targets=targets, train=args.train), Path(args.out)))
    return 0


def save_figure(fig, out: Path) -> Path:
    """Write `fig` to `out` and return the path written: an existing directory gets loss.png inside,
    a name without an extension a PNG with ".png" added (matplotlib's own default, made visible)."""
    if out.is_dir():
        out = out / "loss.png"
    elif not out.suffix:
        out = out.with_name(out.name + ".png")
    make_folder(out.parent, f"--out {out}: its folder")
    try:
        fig.savefig(out)
    except ValueError as e:  # an extension matplotlib cannot write
        raise UsageError(f"--out {out}: {e}") from None
    except OSError as e:
        raise DataError(f"{out}: cannot write ({e.strerror})") from None
    return out


def plot_run_dir(run_dir: Path) -> Path:
    """RUN_DIR/loss.png, as `speedrun plot RUN_DIR` draws it: what a finished run leaves to look at."""
    runs = [load_run(run_dir)]
    return save_figure(plot_runs(runs, targets=_default_targets(runs)), run_dir / "loss.png")


# ---------------------------------------------------------------------------------------------
# compare


def _compare_cells(r: dict, loss: float | None, div: float) -> list[str]:
    if r["status"] != "finished":
        return [r["run"], r["config"], r["status"]]
    cells = [r["run"], r["config"], f"{r['final_val_loss']:.4f}", f"{r['train_time_ms'] / div:.2f}",
             _fmt_count(r["tokens"]), _fmt_count(r["tokens_per_s"]) if r["tokens_per_s"] else DASH,
             f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else DASH]
    if loss is not None:
        cells.append(f"{r['time_to_loss_ms'] / div:.2f}" if r["time_to_loss_ms"] is not None else DASH)
    cells.append(f"{r['time_ratio']:.2f}×" if r["time_ratio"] is not None else DASH)
    return cells


def _cmd_compare(args) -> int:
    runs = load_runs(args.runs)
    loss = args.loss if args.loss is not None else (runs[0].target if runs[0].target > 0 else None)
    rows = compare_rows(runs, loss)
    if args.json:
        print(json.dumps(_json_safe({"loss": loss, "runs": rows}), indent=2))
        return 0
    div, unit = _time_unit(max([r["train_time_ms"] for r in rows if r["status"] == "finished"] or [0.0]))
    header = ["run", "config", "val loss", f"time ({unit})", "tokens", "tok/s", "MFU"]
    if loss is not None:
        header.append(f"time to {loss:g} ({unit})")
    header.append("time ratio")
    table = [cells + [""] * (len(header) - len(cells)) for cells in (_compare_cells(r, loss, div) for r in rows)]
    print(_table(header, table, right=set(range(2, len(header)))))
    for r in rows:
        if r["status"] != "finished":
            print(f"note: {r['run']} {r['status']}")
    odd = [r.name for r in runs[1:] if r.stopped is None and _val_set(r) != _val_set(runs[0])]
    if odd:
        print(f"note: {', '.join(odd)} validated on a different val set than {runs[0].name}; their losses are not comparable")
    return 0


# ---------------------------------------------------------------------------------------------
# record


def _cmd_record(args) -> int:
    if len(args.runs) < 2:
        raise UsageError(f"a record needs at least 2 runs for its t-test, got {len(args.runs)}")
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    runs = load_runs(args.runs)
    target = args.target if args.target is not None else (runs[0].target if runs[0].target > 0 else 3.28)
    res = record_stats(runs, target, args.alpha)
    if args.json:
        print(json.dumps(_json_safe(res), indent=2))
        return 0
    lines = [
        ("runs", f"{res['n']} ({', '.join(res['runs'])})"),
        ("config", res["config"]),
        ("target", f"val loss < {target:g} (one-sided one-sample t-test, alpha {args.alpha:g})"),
        ("val loss", f"{res['loss_mean']:.4f} ± {res['loss_std']:.4f} (mean ± sample std)"),
        ("t", f"{res['t']:.3f} ({res['df']} degrees of freedom)"),
        ("p", f"{res['p']:.4g}"),
        ("train time", f"{res['time_mean_s']:.2f} s ± {res['time_std_s']:.2f} s"),
        ("verdict", res["verdict"]),
    ]
    for name, value in lines:
        print(f"{name:<11} {value}")
    print()
    print("| time | loss mean ± std | n | p | date | config |")
    print("|---|---|---|---|---|---|")
    print(res["markdown"])
    return 0


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot val and train loss curves of runs on one figure",
                       description="Plot the validation and train loss of one or more run directories on one "
                                   "figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--x", choices=["time", "tokens", "step"], default="time", help="x axis (default: time)")
    p.add_argument("--out", default="loss.png", metavar="FILE",
                   help="image to write; a directory gets loss.png inside, a name without an extension .png "
                        "(default: loss.png)")
    p.add_argument("--target", type=float, metavar="LOSS",
                   help="draw a target line (default: the runs' train.target_val_loss; 0: none)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="also draw train loss, smoothed over the raw values drawn faint (default: yes)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("compare", help="table of final loss, time, throughput and time-to-loss of runs",
                       description="Compare run directories side by side; time ratios are relative to the first run.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--loss", type=float, metavar="L",
                   help="report the train time at which val loss first reaches L (default: the first run's target)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("record", help="test whether repeated runs of one config beat the target loss",
                       description="The speedrun record rule: n runs of one config, a one-sided t-test that their "
                                   "mean final val loss is below the target.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--target", type=float, metavar="LOSS",
                   help="target val loss (default: the runs' train.target_val_loss, else 3.28)")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level (default: 0.01)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_record)
