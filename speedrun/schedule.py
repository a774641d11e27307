"""`speedrun schedule`: every scheduled quantity of a preset at every step (stage, lr multiplier,
Muon momentum, long and short attention windows, tokens per step, sequence length, maximum
document length; in JSON also the multi-token and prefix loss weights and whether the head is
tied), as a table, JSON or
a figure, computed from the same functions training calls, so a recipe can be read at a glance
and checked against the record without a GPU.

Rows 0 .. T-1 are the optimizer steps of a T-step run; row T is the final validation, which uses
the schedules' end values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speedrun.attention import NO_WINDOW, SHRINK, window_blocks
from speedrun.config import Config, add_config_arguments, config_from_args, default_preset, scale_steps
from speedrun.errors import SpeedrunError, UsageError
from speedrun.optim import schedule_at
from speedrun.stages import head_tied_at, step_plan, window_at

# Quantities that move linearly (or smoothly) between steps, and those that jump in steps.
RAMPS = ("lr", "muon_momentum")
STEPPED = ("window_long_tokens", "window_long_blocks", "window_short_tokens", "window_short_blocks",
           "tokens_per_step", "seq_len", "max_doc_len", "stage")
# A ramp with more kinks than this is a smooth curve (cosine), not a few linear pieces.
MAX_KINKS = 20
# A smooth curve is printed each time it has moved this fraction of its range.
SMOOTH_STEP = 0.05


def _windows(step: int, cfg: Config) -> dict:
    """Long and short (S-layer) windows at `step`; None tokens means full attention."""
    m = cfg.model
    long, short = window_at(step, cfg)
    if long >= NO_WINDOW:
        return dict.fromkeys(STEPPED[:4])
    block = m.window_block
    if short is not None:  # set by the stages
        short_blocks = short // block
    elif m.window_granularity == "block":
        short_blocks = window_blocks(long, block, SHRINK["S"])
        short = short_blocks * block
    else:
        # The token rule compares (q - kv)·2 < window, so an odd window halves to a fraction.
        short = long // 2 if long % 2 == 0 else long / 2
        short_blocks = short / block
    return {"window_long_tokens": long, "window_long_blocks": long // block,
            "window_short_tokens": short, "window_short_blocks": short_blocks}


def schedule_rows(cfg: Config) -> list[dict]:
    """One dict per step 0 .. cfg.train.steps, with every scheduled quantity."""
    rows = []
    for step in range(cfg.train.steps + 1):
        lr, momentum = schedule_at(step, cfg)
        plan = step_plan(step, cfg)
        rows.append({
            "step": step, "stage": plan.stage, "lr": lr,
            "muon_momentum": momentum if cfg.optim.hidden_optimizer in ("muon", "normuon") else None,
            **_windows(step, cfg),
            "tokens_per_step": plan.batch_tokens, "seq_len": plan.seq_len, "max_doc_len": plan.max_doc_len,
            "mtp_weights": list(plan.mtp_weights), "prefix_weight": plan.prefix_weight,
            "head_tied": head_tied_at(step, cfg) if step < cfg.train.steps else None,
        })
    return rows


def _ramp_rows(values: list) -> tuple[set[int], bool]:
    """Rows worth printing for a ramp, and whether it is a smooth curve. A few linear pieces: the
    rows where a piece starts or ends. A smooth curve (cosine) bends at every step, so: its sharp
    bends (a warmup's end) and a row each time it has moved SMOOTH_STEP of its range."""
    if values[0] is None or len(values) < 3:
        return set(), False
    slopes = [b - a for a, b in zip(values, values[1:])]
    bends = {s: abs(slopes[s] - slopes[s - 1]) for s in range(1, len(slopes))}
    # An absolute tolerance: the values are multipliers near 1, and float noise is ~1e-16.
    kinks = {s for s, bend in bends.items() if bend > 1e-9}
    if len(kinks) <= MAX_KINKS:
        return kinks, False
    steepest = max(abs(d) for d in slopes)
    picked, last = {s for s, bend in bends.items() if bend > 0.1 * steepest}, values[0]
    span = (max(values) - min(values)) * SMOOTH_STEP
    for s, v in enumerate(values):
        if abs(v - last) >= span:
            picked.add(s)
            last = v
    return picked, True


def change_rows(rows: list[dict]) -> tuple[list[int], list[str]]:
    """Steps where a stepped quantity takes a new value or a ramp bends, plus the first and last
    rows, and the ramps that are smooth curves: between two printed rows the stepped values hold
    and the other ramps move linearly."""
    picked, smooth = {0, len(rows) - 1}, []
    for s in range(1, len(rows)):
        if any(rows[s][k] != rows[s - 1][k] for k in STEPPED):
            picked.add(s)
    for key in RAMPS:
        steps, is_smooth = _ramp_rows([r[key] for r in rows])
        picked |= steps
        smooth += [key] if is_smooth else []
    return sorted(picked), smooth


def _window_cell(tokens, blocks) -> str:
    if tokens is None:
        return "full"
    if isinstance(blocks, float) and not blocks.is_integer():
        return f"{tokens:g}"  # token granularity: the window is not whole blocks
    return f"{tokens:g} ({blocks:g})"


def _header(label: str, total: int, every: int | None, smooth: list[str], cfg: Config) -> list[str]:
    m = cfg.model
    if every:
        which = [f"every {every}th row"]
    else:
        linear = [k.replace("muon_", "") for k in RAMPS if k not in smooth]
        between = "in between, windows and tokens hold"
        if linear:
            between += f", {' and '.join(linear)} move{'s' if len(linear) == 1 else ''} linearly"
        between += "".join(f"; {k} is a smooth curve, shown each time it moves {SMOOTH_STEP:.0%} of its range"
                           for k in smooth)
        which = ["rows where a value changes", between]
    rule = "set per stage" if cfg.stages.windows else f"{m.window_schedule} schedule"
    windows = (f"windows in tokens (blocks of {m.window_block}), {rule}, "
               f"{m.window_granularity} granularity; S layers use the short window" if m.sliding_window
               else "no sliding window: every layer attends to the whole sequence")
    lines = [f"{label}: {total} steps; {which[0]}; row {total} is the final validation", *which[1:], windows]
    if cfg.stages.ends:
        ends = cfg.stages.ends
        extension = (f"steps {ends[-1]}..{total - 1} are the extension stage {len(ends)}" if ends[-1] < total
                     else "no extension steps")
        lines.append(f"stages end at steps {', '.join(map(str, ends))}; {extension}; the lr schedule spans the "
                     f"first {ends[-1]} steps")
    return lines


def format_table(label: str, rows: list[dict], every: int | None, cfg: Config) -> str:
    total = len(rows) - 1
    if every:
        steps, smooth = sorted(set(range(0, total + 1, every)) | {total}), []
    else:
        steps, smooth = change_rows(rows)
    lines = [*_header(label, total, every, smooth, cfg),
             f"{'step':>6} {'stage':>5} {'lr':>7} {'momentum':>8} {'long window':>12} {'short window':>12} "
             f"{'tokens/step':>12} {'seq len':>8} {'max doc':>7}"]
    for s in steps:
        r = rows[s]
        mom = f"{r['muon_momentum']:.4f}" if r["muon_momentum"] is not None else "—"
        lines.append(f"{s:>6} {r['stage']:>5} {r['lr']:>7.4f} {mom:>8} "
                     f"{_window_cell(r['window_long_tokens'], r['window_long_blocks']):>12} "
                     f"{_window_cell(r['window_short_tokens'], r['window_short_blocks']):>12} "
                     f"{r['tokens_per_step']:>12,} {r['seq_len']:>8,} {r['max_doc_len'] or '—':>7}")
    return "\n".join(lines)


def check_plot_path(path: str) -> Path:
    """Refuse an unwritable figure path before any work is done."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--plot {path}: is a directory, not an image file")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--plot {path}: folder '{folder}' does not exist")
    if out.suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        if out.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
            raise UsageError(f"--plot {path}: matplotlib cannot write '{out.suffix}' images (try .png)")
    return out


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_yticks([])


def plot_schedule(label: str, rows: list[dict]):
    """Stacked panels sharing the step axis; stepped quantities are drawn as steps. Returns the
    matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(8, 10))
    axes = fig.subplots(4, 1, sharex=True)
    axes[0].plot(steps, [r["lr"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("lr multiplier")
    axes[0].set_ylim(bottom=0)
    if rows[0]["muon_momentum"] is None:
        _no_data(axes[1], "no Muon (optim.hidden_optimizer = adam)")
    else:
        axes[1].plot(steps, [r["muon_momentum"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("Muon momentum")
    if rows[0]["window_long_tokens"] is None:
        _no_data(axes[2], "no sliding window (full attention)")
    else:
        axes[2].step(steps, [r["window_long_tokens"] for r in rows], where="post", label="long (L layers)")
        axes[2].step(steps, [r["window_short_tokens"] for r in rows], where="post", label="short (S layers)")
        axes[2].set_ylim(bottom=0)
        axes[2].legend(loc="upper left", fontsize="small")
    axes[2].set_ylabel("window (tokens)")
    axes[3].step(steps, [r["tokens_per_step"] for r in rows], where="post", label="tokens per step")
    axes[3].step(steps, [r["seq_len"] for r in rows], where="post", label="sequence length")
    if any(r["max_doc_len"] for r in rows):
        axes[3].step(steps, [r["max_doc_len"] or None for r in rows], where="post", label="max document length")
    # A log axis: a sequence is often a thousandth of a batch and would hug zero on a linear one.
    axes[3].set_yscale("log", base=2)
    axes[3].set_ylabel("tokens (log scale)")
    axes[3].legend(loc="center left", fontsize="small")
    axes[3].set_xlabel(f"step (row {steps[-1]} is the final validation)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    for ax in axes[2:]:
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    fig.suptitle(f"{label}: schedules over {steps[-1]} steps")
    fig.tight_layout()
    return fig


def register(sub) -> None:
    p = sub.add_parser("schedule", help="show every scheduled quantity of a preset per step",
                       description="Print the stage, lr multiplier, Muon momentum, attention windows, tokens per step, "
                                   "sequence length and maximum document length at every step of a preset, as "
                                   "training computes them. Needs no GPU and no data.")
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=None, metavar="N", help="scale the run to N steps, as `speedrun train --steps`")
    p.add_argument("--every", type=int, default=None, metavar="N",
                   help="print every Nth row (and the last) instead of the rows where a value changes")
    p.add_argument("--json", action="store_true", help="print one JSON object with every step")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a figure instead of the table")
    p.set_defaults(func=_cmd_schedule)


def _label(preset: str | None, config: str | None) -> str:
    if preset and config:
        return f"{preset} + {config}"
    return preset or config or default_preset()


def _cmd_schedule(args: argparse.Namespace) -> int:
    if args.every is not None and args.every <= 0:
        raise UsageError(f"--every must be positive, got {args.every}")
    out = check_plot_path(args.plot) if args.plot else None
    cfg = config_from_args(args)
    if args.steps is not None:
        scale_steps(cfg, args.steps)
    label, rows = _label(args.preset, args.config), schedule_rows(cfg)
    if out is not None:
        try:
            plot_schedule(label, rows).savefig(out)
        except OSError as e:
            raise SpeedrunError(f"{out}: cannot write ({e.strerror or e})") from None
    if args.json:
        report = {"preset": label, "steps": cfg.train.steps, "window_block": cfg.model.window_block,
                  "window_schedule": cfg.model.window_schedule, "window_granularity": cfg.model.window_granularity,
                  "rows": rows}
        if out is not None:
            report["plot"] = str(out)
        print(json.dumps(report))
    elif out is not None:
        print(out)
    else:
        print(format_table(label, rows, args.every, cfg))
    return 0
