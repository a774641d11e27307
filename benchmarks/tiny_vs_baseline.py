"""Train `tiny` (the speedrun recipe) and `baseline-tiny` (the nanoGPT recipe) one after the other on
the same data, the same tokens and the same seed, then print `speedrun compare` and write a plot.

    python benchmarks/tiny_vs_baseline.py [--out runs/bench-tiny] [--steps N] [extra `speedrun train` args]
"""

import argparse
import subprocess
import sys
from pathlib import Path


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
    runs = [str(out / "tiny"), str(out / "baseline-tiny")]
    subprocess.run([*speedrun, "compare", *runs], check=True)
    subprocess.run([*speedrun, "plot", *runs, "--x", "time", "--out", str(out / "loss.png")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
