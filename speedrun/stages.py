"""The plan of each training step: its stage, batch shape, lr factor and attention windows.

Without [stages] every step has the same batch (data.batch_tokens, data.seq_len,
data.max_doc_len), an lr factor of 1, and the long window of model.window_schedule (S layers
halve it). With [stages] (the 2026 record) the run is split at stages.ends into stages, plus an
extension stage after the last end, and each stage may set its own lr factor, tokens per step,
sequence length, maximum document length, (short, long) windows, loss weights (multi-token and
prefix, each ramping linearly from the stage's start value to its end value) and whether the head
is tied; the lr cooldown then runs over the scheduled steps (up to the last end), so the extension
stage trains at its floor.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from speedrun.attention import window_tokens
from speedrun.config import Config, ConfigError


@dataclass(frozen=True)
class StepPlan:
    stage: int
    lr_factor: float
    batch_tokens: int
    seq_len: int
    max_doc_len: int
    window: int  # the long window, tokens
    short_window: int | None  # the S layers' window, tokens; None: the long window halved
    mtp_weights: tuple[float, ...] = (1.0,)  # loss weights on the next token and those after it
    prefix_weight: float = 0.0  # weight of the prefix-token loss


def scheduled_steps(cfg: Config) -> int:
    """The steps the lr schedule spans: up to the last stage end, else the whole run."""
    return cfg.stages.ends[-1] if cfg.stages.ends else cfg.train.steps


def stage_of(step: int, cfg: Config) -> int:
    """0-based stage of `step`; len(stages.ends) is the extension stage."""
    return bisect.bisect_right(cfg.stages.ends, step)


def _staged(values: list, stage: int, default):
    return values[stage] if values else default


def stage_progress(step: int, cfg: Config) -> float:
    """How far `step` is into its stage, (step - start) / (end - start), the extension stage ending
    with the run: 0 at a stage's first step, never 1 (as the record's ramps)."""
    bounds = [0, *cfg.stages.ends, cfg.train.steps]
    stage = stage_of(step, cfg)
    start, end = bounds[stage], bounds[stage + 1]
    return min(max((step - start) / (end - start), 0.0), 1.0) if end > start else 1.0


def _ramp(start, end, t: float):
    return start + (end - start) * t


def loss_weights(step: int, cfg: Config) -> tuple[tuple[float, ...], float]:
    """(multi-token weights, prefix weight) at `step`: [1.0] and 0 without stages' lists."""
    s, stage, t = cfg.stages, stage_of(step, cfg), stage_progress(step, cfg)
    mtp = (1.0,)
    if s.mtp_weights_start:
        mtp = tuple(_ramp(a, b, t) for a, b in zip(s.mtp_weights_start[stage], s.mtp_weights_end[stage]))
    prefix = _ramp(s.prefix_weight_start[stage], s.prefix_weight_end[stage], t) if s.prefix_weight_start else 0.0
    return mtp, prefix


def step_plan(step: int, cfg: Config) -> StepPlan:
    """What training step `step` (0-based) runs with."""
    s, d, m = cfg.stages, cfg.data, cfg.model
    stage = stage_of(step, cfg)
    mtp, prefix = loss_weights(step, cfg)
    if s.windows:
        short, long = (blocks * m.window_block for blocks in s.windows[stage])
    else:
        short, long = None, window_tokens(step, cfg.train.steps, m)
    return StepPlan(stage=stage, lr_factor=_staged(s.lr, stage, 1.0),
                    batch_tokens=_staged(s.batch_tokens, stage, d.batch_tokens),
                    seq_len=_staged(s.seq_len, stage, d.seq_len),
                    max_doc_len=_staged(s.max_doc_len, stage, d.max_doc_len),
                    window=long, short_window=short, mtp_weights=mtp, prefix_weight=prefix)


def untie_step(cfg: Config) -> int | None:
    """The step after whose update the head and embedding untie (E6): the first step of the first
    untied stage, moved on to Adam's next update step (optim.adam_update_every), as the record
    unties after step 847 = 847 | 1. None when stages.head_tied never unties."""
    s, every = cfg.stages, cfg.optim.adam_update_every
    if not s.head_tied or all(s.head_tied):
        return None
    start = ([0, *s.ends])[s.head_tied.index(False)]
    return start + (every - 1 - start) % every


def head_tied_at(step: int, cfg: Config) -> bool:
    """Whether training step `step` updates the head and embedding as one matrix."""
    untie = untie_step(cfg)
    return bool(cfg.stages.head_tied) and (untie is None or step <= untie)


def graph_key(step: int, cfg: Config) -> tuple:
    """What shapes a compiled training step at `step`: the sequence length, the number of
    multi-token weights and whether the stage has a prefix loss. A warm-up covers each new key."""
    s, stage = cfg.stages, stage_of(step, cfg)
    prefix = bool(s.prefix_weight_start) and bool(s.prefix_weight_start[stage] or s.prefix_weight_end[stage])
    plan = step_plan(step, cfg)
    return plan.seq_len, len(plan.mtp_weights), prefix


def yarn_windows(step: int, cfg: Config) -> list[int]:
    """The long windows (tokens) the run has trained with up to `step`, each change once, in order:
    what YaRN's state at `step` follows from (GPT.set_yarn)."""
    seen: list[int] = []
    for start in [0, *cfg.stages.ends] if cfg.stages.windows else [0]:
        if start <= step:
            long = step_plan(start, cfg).window
            if not seen or seen[-1] != long:
                seen.append(long)
    return seen


def final_windows(cfg: Config) -> tuple[int, int | None]:
    """(long, short) windows of the final validation: stages.final_windows, else those of the last step."""
    if cfg.stages.final_windows:
        short, long = (blocks * cfg.model.window_block for blocks in cfg.stages.final_windows)
        return long, short
    last = step_plan(cfg.train.steps, cfg)
    return last.window, last.short_window


def window_at(step: int, cfg: Config) -> tuple[int, int | None]:
    """(long, short) windows at `step`; step == train.steps is the final validation."""
    if step >= cfg.train.steps:
        return final_windows(cfg)
    plan = step_plan(step, cfg)
    return plan.window, plan.short_window


def shape_steps(cfg: Config) -> list[int]:
    """The first step of every distinct batch shape (sequence length, tokens per step), in order:
    what must divide over the ranks, and where a compile warm-up looks for new sequence lengths."""
    firsts: dict[tuple[int, int], int] = {}
    for start in [0, *cfg.stages.ends]:
        if start < cfg.train.steps:
            plan = step_plan(start, cfg)
            firsts.setdefault((plan.seq_len, plan.batch_tokens), start)
    return sorted(firsts.values())


def tokens_before(step: int, cfg: Config) -> int:
    """Training tokens of steps 0 .. step - 1."""
    starts = [0, *cfg.stages.ends]
    total = 0
    for stage, start in enumerate(starts):
        end = starts[stage + 1] if stage + 1 < len(starts) else step
        total += max(0, min(step, end) - start) * step_plan(start, cfg).batch_tokens
    return total


def grad_accum(plan: StepPlan, cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step on each rank, so that the global batch never depends on W."""
    per_micro = plan.seq_len * cfg.data.micro_batch_seqs * world_size
    if plan.batch_tokens % per_micro:
        where = f"stage {plan.stage}'s stages.batch_tokens" if cfg.stages.batch_tokens else "data.batch_tokens"
        raise ConfigError(f"'{where}' ({plan.batch_tokens}) is not divisible by world size {world_size} × sequence "
                          f"length {plan.seq_len} × data.micro_batch_seqs {cfg.data.micro_batch_seqs}; choose a "
                          "world size or micro-batch that divides the global batch")
    return plan.batch_tokens // per_micro
