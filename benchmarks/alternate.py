"""Per-token step time of presets, or of variants of one, side by side in one process: the trainers
take turns, a block of steps each, for several rounds, so that a shared machine's drift falls on all
of them alike. Prints ms per 1,024 tokens (median and best over the rounds) and each one's ratio of
tokens per second to the first's. docs/benchmarks.md's equal-cadence comparison of tiny and
baseline-tiny comes from it:

    python benchmarks/alternate.py tiny baseline-tiny \\
        "tiny@4k=tiny;stages.batch_tokens=[4096,4096,4096,4096];stages.seq_len=[1024,1024,1024,1024]"

A spec is [LABEL=]PRESET[;KEY=VALUE...], the overrides as train's --set. Each trainer warms up the
shapes of the steps it times (compiled as its preset says) before the first round.

    python benchmarks/alternate.py SPEC [SPEC ...] [--rounds 6] [--block 2] [--start 2]
"""

import argparse
import statistics
import time

from speedrun.config import Config, load_config
from speedrun.distributed import setup, teardown
from speedrun.stages import step_plan
from speedrun.train import Trainer


def parse_spec(spec: str) -> tuple[str, Config]:
    """'[LABEL=]PRESET[;KEY=VALUE...]' -> (label, the CPU config)."""
    head, *overrides = spec.split(";")
    label, _, preset = head.rpartition("=")
    cfg = load_config(preset, overrides=overrides)
    cfg.train.device = "cpu"
    return label or preset, cfg


def alternate(specs: list[str], rounds: int, block: int, start: int) -> dict[str, list[float]]:
    """ms per 1,024 tokens of every round's block of `block` steps from step `start` on, per label."""
    parsed = [parse_spec(spec) for spec in specs]  # every spec checked before the first compile
    rt = setup("cpu")
    trainers = []
    for label, cfg in parsed:
        trainer = Trainer(cfg, rt, label)
        trainer.step = start
        trainer.warm_up(2, until=start + rounds * block)
        trainers.append((label, trainer, cfg))
    times = {label: [] for label, _, _ in trainers}
    for r in range(rounds):
        steps = range(start + r * block, start + (r + 1) * block)
        for label, trainer, cfg in trainers:
            began = time.perf_counter()
            for step in steps:
                trainer.train_step(step)
            tokens = sum(step_plan(step, cfg).batch_tokens for step in steps)
            times[label].append((time.perf_counter() - began) * 1e3 * 1024 / tokens)
    teardown()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2, help="steps a trainer runs in each turn")
    parser.add_argument("--start", type=int, default=2, help="the first timed step (its stage's batch and windows)")
    args = parser.parse_args()
    times = alternate(args.specs, args.rounds, args.block, args.start)
    first = statistics.median(next(iter(times.values())))
    print(f"{'run':<16} {'ms/1k tokens (median)':>22} {'best':>8} {'tokens/s ratio':>15}")
    for label, ms in times.items():
        print(f"{label:<16} {statistics.median(ms):>22.1f} {min(ms):>8.1f} {first / statistics.median(ms):>14.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
