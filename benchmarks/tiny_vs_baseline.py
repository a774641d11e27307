"""Train `tiny` (the speedrun recipe) and `baseline-tiny` (the nanoGPT recipe) one after the other on
the same data, the same tokens and the same seed, then print `speedrun compare` and write a plot.
As the floor a model must beat, it also prints the built-in corpus's unigram entropy and the val
cross-entropy of the (add-one smoothed) train unigram distribution, in nats per token.

    python benchmarks/tiny_vs_baseline.py [--out runs/bench-tiny] [--steps N] [extra `speedrun train` args]
"""

import argparse
import subprocess
import sys
from pathlib import Path


def unigram_reference() -> tuple[float, float]:
    import numpy as np

    from speedrun.data.corpus import builtin_corpus_dir
    from speedrun.data.loader import find_shards
    from speedrun.data.shards import read_shard
    from speedrun.data.tokenizer import VOCAB_SIZE

    train, val = find_shards(builtin_corpus_dir(), "*_train_*.bin", "*_val_*.bin")
    counts = sum(np.bincount(read_shard(f), minlength=VOCAB_SIZE) for f in train).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    smoothed = (counts + 1) / (counts.sum() + VOCAB_SIZE)
    val_tokens = np.concatenate([read_shard(f) for f in val])
    return float(-(p * np.log(p)).sum()), float(-np.log(smoothed[val_tokens]).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-tiny")
    parser.add_argument("--steps", type=int)
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    steps = ["--steps", str(args.steps)] if args.steps else []
    speedrun = [sys.executable, "-m", "speedrun"]
    for preset in ("tiny", "baseline-tiny"):
        subprocess.run([*speedrun, "train", "--preset", preset, "--out", str(out / preset), *steps, *extra], check=True)
    entropy, val_ce = unigram_reference()
    print(f"built-in corpus: train unigram entropy {entropy:.3f} nats/token; val CE under it {val_ce:.3f}")
    runs = [str(out / "tiny"), str(out / "baseline-tiny")]
    subprocess.run([*speedrun, "compare", *runs], check=True)
    subprocess.run([*speedrun, "plot", *runs, "--x", "time", "--out", str(out / "loss.png")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
