"""`speedrun bench`: step time, tokens/s, MFU, peak memory and compile time of a preset on this
device, measured after warm-up as medians over several steps, each timed as `speedrun train` times
it (`train.Stopwatch`: steps queued back to back, the device waited for only when the times are
read); `--at` times a later part of the run (its stage's batch and window), `--vs` measures a
second preset in the same process for a side-by-side ratio. Each result also counts the graphs
torch.compile compiled during the timed steps (`recompiles`): 0 in a healthy run, where warm-up
compiled everything and nothing (a growing window, a new shape, an lr) makes Dynamo compile again."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from speedrun.config import COMPILE_HELP, default_preset, load_config
from speedrun.errors import UsageError
from speedrun.prepare import graphs_compiled
from speedrun.distributed import setup, teardown
from speedrun.stages import step_plan
from speedrun.runlog import device_description, mfu, peak_flops, peak_memory_mib


def measure(preset: str, overrides: list[str], steps: int, warmup: int, device: str, compile: bool | None,
            at: int = 0) -> dict:
    """Times steps at, at + 1, ... at + steps - 1 of `preset`'s run (their stage, batch and window)."""
    from speedrun.train import Stopwatch, Trainer

    cfg = load_config(preset, None, overrides)
    cfg.train.device = device
    if compile is not None:
        cfg.train.compile = compile
    rt = setup(cfg.train.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    trainer = Trainer(cfg, rt, preset)
    trainer.step = at
    warmed, warm_s = trainer.warm_up(warmup, until=at + steps)  # only the shapes the timed steps use
    graphs_before = graphs_compiled()
    watch = Stopwatch(rt.device)
    watch.start()
    for step in range(at, at + steps):
        trainer.train_step(step)
        watch.mark(step)
    ends = [ms / 1000 for _, ms in watch.laps()]
    times = [end - begin for begin, end in zip([0.0, *ends], ends)]
    recompiles = graphs_compiled() - graphs_before
    step_s = statistics.median(times)
    plan = step_plan(at, cfg)
    tokens_per_s = plan.batch_tokens / step_s
    utilisation = mfu(trainer.model.flops_per_token(plan.seq_len), tokens_per_s, peak_flops(rt.device),
                      rt.world_size)
    return {
        "preset": preset, "device": device_description(rt.device), "world_size": rt.world_size,
        "torch": torch.__version__, "compile": cfg.train.compile, "at": at, "steps": steps,
        "step_ms": round(step_s * 1000, 2), "step_ms_min": round(min(times) * 1000, 2),
        "tokens_per_step": plan.batch_tokens, "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(utilisation, 4) if utilisation is not None else None,
        "peak_memory_mib": round(peak_memory_mib(rt.device), 1),
        # Warm-up time less what the same number of steady steps take: the one-off compile cost of
        # the timed steps' shapes (a whole run also compiles every later stage's).
        "compile_s": round(max(warm_s - warmed * step_s, 0.0), 2),
        "recompiles": recompiles,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def _check_timed_steps(preset: str, cfg, at: int, steps: int) -> None:
    """The timed steps lie in the run and share one batch size, which tokens/s and MFU are counted by."""
    last = at + steps - 1
    if last >= cfg.train.steps:
        raise UsageError(f"--at {at} --steps {steps} times steps up to {last}, past {preset}'s last step "
                         f"({cfg.train.steps - 1})")
    first_plan, last_plan = step_plan(at, cfg), step_plan(last, cfg)
    if (first_plan.batch_tokens, first_plan.seq_len) != (last_plan.batch_tokens, last_plan.seq_len):
        raise UsageError(f"--at {at} --steps {steps}: {preset}'s steps {at} and {last} lie in stages with other "
                         f"batches ({first_plan.batch_tokens:,} and {last_plan.batch_tokens:,} tokens); time one stage")


def compile_latency(preset: str, overrides: list[str], device: str, at: int = 0) -> dict:
    """Cold and warm compile time: the same one-step bench (at step `at`) twice in fresh processes
    sharing a new, empty compile cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, "-m", "speedrun", "bench", "--preset", preset, "--at", str(at), "--steps", "1",
               "--warmup", "1", "--device", device, "--compile", "--json", *sum((["--set", o] for o in overrides), [])]
        runs = [json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
                for _ in range(2)]
    return {"cold_compile_s": runs[0]["results"][0]["compile_s"], "warm_compile_s": runs[1]["results"][0]["compile_s"]}


def _row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
    return (f"{r['preset']:<22} {r['step_ms']:>10.1f} {r['tokens_per_s']:>12,.0f} {mfu:>7} "
            f"{r['peak_memory_mib']:>10,.0f} {r['compile_s']:>9.1f} {r['recompiles']:>10}")


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure step time, tokens/s, MFU, memory, compile time and recompiles",
                       description="Benchmark presets on this device: medians over --steps steps after --warmup "
                                   "untimed steps. Timings are for comparison within one run; ratios are reported.")
    p.add_argument("--preset", default=None, help="preset to measure (default: tiny on CPU, gpt2-speedrun on CUDA)")
    p.add_argument("--vs", help="a second preset measured in the same process, reported as a ratio")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to both presets")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--at", type=int, default=0, metavar="STEP",
                   help="time the run's steps from STEP on, with their stage's batch and window (default 0)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first, per compiled shape that the timed steps use (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=COMPILE_HELP)
    p.add_argument("--compile-latency", action="store_true",
                   help="also measure cold and warm compile time in fresh processes sharing an empty cache")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0 or args.at < 0:
        raise UsageError(f"--steps must be at least 1, --warmup and --at at least 0, got {args.steps}, {args.warmup} "
                         f"and {args.at}")
    preset = args.preset or default_preset()
    for name in [preset] + ([args.vs] if args.vs else []):  # all checked before the first benchmark
        _check_timed_steps(name, load_config(name, None, args.set), args.at, args.steps)
    try:
        results = [measure(name, args.set, args.steps, args.warmup, args.device, args.compile, args.at)
                   for name in [preset] + ([args.vs] if args.vs else [])]
    finally:
        teardown()
    report = {"results": results}
    if args.vs:
        a, b = results
        report["ratio"] = {"step_ms": round(a["step_ms"] / b["step_ms"], 3),
                           "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3)}
    if args.compile_latency:
        report["compile_latency"] = compile_latency(preset, args.set, args.device, args.at)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"device: {results[0]['device']}  torch {results[0]['torch']}  steps: {args.steps} from step {args.at} "
          "(median)")
    print(f"{'preset':<22} {'step ms':>10} {'tokens/s':>12} {'MFU':>7} {'peak MiB':>10} {'compile s':>9} {'recompiles':>10}")
    for r in results:
        print(_row(r))
    for r in results:
        if r["recompiles"]:
            print(f"warning: {r['preset']}: torch.compile compiled {r['recompiles']} graph(s) during the timed steps, "
                  "so its step times include compilation: too few --warmup steps, or a recompile "
                  "(TORCH_LOGS=recompiles says why)")
    if args.vs:
        print(f"ratio {preset}/{args.vs}: step time {report['ratio']['step_ms']:.3f}×, "
              f"tokens/s {report['ratio']['tokens_per_s']:.3f}×")
    if args.compile_latency:
        c = report["compile_latency"]
        print(f"compile: cold {c['cold_compile_s']:.1f}s, warm (cache reused) {c['warm_compile_s']:.1f}s")
    return 0
