"""Where a training step's time goes, per preset: torch.profiler over a few steps after warm-up,
as a run executes them (compiled as the preset says, train.compile = "auto" by default: the loss
tail on CPU; --compile the whole model, --no-compile nothing), summed into the step's phases (compiled
forward, compiled backward, each optimizer's step, the rest) and its most expensive operators.
Run it on a quiet machine; the figures in docs/benchmarks.md come from it.

    python benchmarks/profile_cpu.py [--presets tiny baseline-tiny] [--steps 2] [--top 12] [--compile | --no-compile]
                                     [--start STEP] [--set key=value]...   (applied to every preset listed)
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from speedrun.config import load_config
from speedrun.distributed import setup, teardown
from speedrun.stages import step_plan
from speedrun.train import Trainer

# profiler events that are a phase of the step, by the name torch gives them
PHASES = {"forward": "CompiledFunction", "backward": "CompiledFunctionBackward"}


def profile_preset(preset: str, steps: int, compile: bool | str | None, overrides: list[str], start: int):
    """Steps start+2 .. start+steps+1 profiled, after the warm-up and two steps from `start` (a later
    stage's shapes and windows) that are not."""
    cfg = load_config(preset, overrides=overrides)
    cfg.train.device = "cpu"
    if compile is not None:
        cfg.train.compile = compile
    trainer = Trainer(cfg, setup("cpu"), preset)
    trainer.warm_up(2)
    for step in range(start, start + 2):
        trainer.train_step(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(start + 2, start + 2 + steps):
            trainer.train_step(step)
    return prof.key_averages(), step_plan(start + 2, cfg).batch_tokens


def phases(events, steps: int) -> dict[str, float]:
    """ms per step of each phase; "step" is the whole step as the profiler saw it."""
    by_name = {e.key: e.cpu_time_total / 1e3 / steps for e in events}
    out = {phase: by_name.get(name, 0.0) for phase, name in PHASES.items()}
    out.update({name.split("#")[1].removesuffix(".step"): ms for name, ms in by_name.items()
                if name.startswith("Optimizer.step#")})
    out["step"] = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "baseline-tiny"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile", dest="compile", action="store_const", const=True,
                        help="compile the whole model (default: the preset's train.compile, 'auto')")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    parser.add_argument("--start", type=int, default=0,
                        help="profile from step START+2, in that step's stage (default: the first steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as train's --set, for every preset listed")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compile={args.compile}")
    for preset in args.presets:
        events, tokens = profile_preset(preset, args.steps, args.compile, args.overrides, args.start)
        summary = phases(events, args.steps)
        print(f"\n{preset}: {summary['step']:.0f} ms/step, {1e3 * summary['step'] / tokens:.3f} ms per 1k tokens")
        for name, ms in summary.items():
            if name != "step" and ms > 0:  # phases of what this run compiles, its optimizers
                print(f"  {name:<12} {ms:8.0f} ms  {100 * ms / summary['step']:5.1f}%")
        print("  top operators by own time (ms/step):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"    {e.key[:60]:<60} {e.self_cpu_time_total / 1e3 / args.steps:8.1f}  x{e.count // args.steps}")
    teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
