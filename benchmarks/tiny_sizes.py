"""Which sizes make `tiny` learn the most per second on this machine: train `tiny` and variants of it
that each change one size (width, depth, value-embedding tables, batch), one after the other on
the same data and seed, then print `speedrun compare` against the time each took to reach the
base's final val loss. The figures in docs/benchmarks.md ("Sizing tiny") come from it.

    python benchmarks/tiny_sizes.py [--out runs/tiny-sizes] [--only NAME ...] [extra `speedrun train` args]
    python benchmarks/tiny_sizes.py --time [--only NAME ...] [--rounds 3]

A finished variant (its run directory has summary.json) is not trained again, so the same command
continues an interrupted sweep. A shared 2-core machine's speed drifts by 10-20% between runs
minutes apart, more than some variants differ, so `--time` measures the speed side by side
instead: every variant's model in one process, the steps of each stage timed in turn, round after
round, and each run's train time estimated from the median step times.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


ONE_K = "stages.seq_len=[1024,1024,1024,1024]"  # every stage in sequences of 1,024 tokens

# name -> `speedrun train` arguments on top of `--preset tiny`; the layer lists of other depths keep
# the 6-block layout's places (first blocks, last blocks)
VARIANTS = {
    "base": [],
    "width-96": sets("model.model_dim=96", "model.head_dim=48"),
    "width-256": sets("model.model_dim=256", "model.n_head=4"),
    "depth-4": sets("model.n_layer=4", "model.long_short_pattern='SLSL'", "model.value_embed_layers=[1,2,3]",
                    "model.attn_input_layer=2", "model.attn_gate_layers=[2,3]", "model.composable_layers=[3]"),
    "depth-8": sets("model.n_layer=8", "model.long_short_pattern='SSSLSSSL'", "model.value_embed_layers=[1,6,7]",
                    "model.skip_connections=[[2,5]]", "model.attn_input_layer=5", "model.gate_split_layer=3",
                    "model.xsa_layers=[1,5]", "model.attn_gate_layers=[3,7]", "model.composable_layers=[7]"),
    "value-tables-1": sets("model.value_embed_layers=[5]"),
    "value-tables-0": sets("model.value_embed_layers=[]"),
    "bigram-0": sets("model.bigram_vocab=0", "model.bigram_sign_rows=0"),
    # tiny's 245,760 tokens in other batches of sequences of 1,024 (as when they were measured; tiny's
    # third stage is now one of 2,048): the record's 1 : 2 : 3 ratio at 1 and 2 sequences per unit, and
    # one sequence throughout
    "batches-1-2-3": ["--steps", "120", *sets("stages.batch_tokens=[1024,2048,3072,3072]", ONE_K)],
    "batches-2-4-6": ["--steps", "60", *sets("stages.batch_tokens=[2048,4096,6144,6144]", ONE_K)],
    "batches-1-1-1": ["--steps", "240", *sets("stages.batch_tokens=[1024,1024,1024,1024]", ONE_K)],
}


def time_variants(names: list[str], rounds: int) -> None:
    """Median seconds per step of each stage, side by side, and the run's train time they add up to."""
    from speedrun.ablate import run_config
    from speedrun.distributed import setup
    from speedrun.stages import stage_of
    from speedrun.train import Trainer

    runtime = setup("cpu")
    trainers = {name: Trainer(run_config(["--preset", "tiny", "--device", "cpu", *VARIANTS[name]]), runtime, name)
                for name in names}
    for trainer in trainers.values():
        trainer.warm_up(1)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            cfg = trainer.cfg
            for start in [0, *cfg.stages.ends[:-1]]:
                begin = time.perf_counter()
                trainer.train_step(start)
                times.setdefault((name, start), []).append(time.perf_counter() - begin)
    print(f"{'variant':<16} {'s/step by stage':<24} {'est. train time':>15}")
    for name, trainer in trainers.items():
        cfg = trainer.cfg
        starts = [0, *cfg.stages.ends[:-1]]
        per_stage = [statistics.median(times[(name, s)]) for s in starts]
        total = sum(per_stage[min(stage_of(step, cfg), len(starts) - 1)] for step in range(cfg.train.steps))
        print(f"{name:<16} {' / '.join(f'{t:.2f}' for t in per_stage):<24} {total:>13.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny-sizes")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="train these variants only")
    parser.add_argument("--time", action="store_true", help="time the variants side by side instead of training them")
    parser.add_argument("--rounds", type=int, default=3)
    args, extra = parser.parse_known_args()
    if args.time:
        time_variants(args.only or list(VARIANTS), args.rounds)
        return 0
    out = Path(args.out)
    speedrun = [sys.executable, "-m", "speedrun"]
    names = args.only or list(VARIANTS)
    for name in names:
        if not (out / name / "summary.json").exists():
            subprocess.run([*speedrun, "train", "--preset", "tiny", "--out", str(out / name), *VARIANTS[name], *extra],
                           check=True)
    runs = [str(out / name) for name in names]
    base_loss = json.loads((out / names[0] / "summary.json").read_text())["final_val_loss"]
    subprocess.run([*speedrun, "compare", *runs, "--loss", str(base_loss)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
