"""Ablation of the 2026 record's optimizer, schedule and data pieces on CPU: `tiny-2025` (the 2025 recipe)
and then each piece added on top of the one before, ending at `tiny`'s optimizer, stages and data as they were before
its sizing (docs/benchmarks.md, "Sizing tiny": smaller batches over more steps), all on the built-in corpus with the
same seed; prints `speedrun compare` and writes val loss against train time.

    python benchmarks/ablation_2026.py [--out runs/ablation-2026] [--only N ...] [extra `speedrun train` args]
"""

import argparse
import subprocess
import sys
from pathlib import Path

# (run name, what it adds, the `--set` overrides it adds to every one before it). The last step's
# sum is tiny's optimizer, stages and data (it keeps fp32 weights on CPU), as tests/test_stages.py
# checks; the model and loss of the record's second part are measured by `speedrun ablate`.
PIECES = [
    ("0-tiny-2025", "the 2025 recipe (tiny)", []),
    ("1-polar-express", "Polar Express instead of the quintic", ["optim.orthogonalizer=polar_express"]),
    ("2-normuon", "NorMuon: β2 0.9, Q/K per head pair, c_proj lr ×2, lr 0.023",
     ["optim.hidden_optimizer=normuon", "optim.qk_blocks=head_pair", "optim.lr_mul_mlp_out=2.0", "optim.lr_hidden=0.023"]),
    ("3-cautious-wd", "cautious weight decay ∝ lr² (1.2; head 0.75, embed 0.025)",
     ["optim.weight_decay_mode=cautious", "optim.weight_decay=1.2", "optim.role_weight_decay={head=0.75, embed=0.025}"]),
    ("4-record-adam", "Adam on odd steps over two steps' gradients, the record's betas",
     ["optim.adam_update_every=2", "optim.role_adam_betas={head=[0.5, 0.95], embed=[0.75, 0.95], scalar=[0.9, 0.99]}"]),
    ("5-stage-lr", "stage lr 1 / 1.52 / 1.73, cooldown over 60% to 0.15, momentum cool-down",
     ["stages.ends=[23, 46, 69]", "stages.lr=[1.0, 1.52, 1.73, 1.0]", "optim.cooldown_frac=0.6",
      "optim.final_lr_frac=0.15", "optim.muon_momentum_warmup_steps=16", "optim.muon_momentum_cooldown_steps=3"]),
    ("6-batch-schedule", "batch 2,048 → 4,096 → 6,144 tokens (the record's 1 : 2 : 3)",
     ["data.micro_batch_seqs=1", "stages.batch_tokens=[2048, 4096, 6144, 6144]", "stages.seq_len=[1024, 1024, 1024, 1024]"]),
    ("7-bos-documents", "BOS-aligned documents cut at 256, then 512 tokens",
     ["data.bos_aligned=true", "stages.max_doc_len=[256, 512, 512, 512]"]),
    ("8-stage-windows", "windows by stage (the record's (1,3) → (6,13) shape, scaled), final (2, 4)",
     ["stages.windows=[[1, 1], [1, 2], [2, 3], [2, 4]]", "stages.final_windows=[2, 4]"]),
]


def cumulative_overrides(upto: int) -> list[str]:
    return [o for _, _, overrides in PIECES[:upto + 1] for o in overrides]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation-2026")
    parser.add_argument("--only", type=int, nargs="*", help="run only these pieces (by number); compare all found")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    speedrun = [sys.executable, "-m", "speedrun"]
    for i, (name, what, _) in enumerate(PIECES):
        if args.only is not None and i not in args.only:
            continue
        print(f"== {name}: {what}", flush=True)
        sets = [arg for o in cumulative_overrides(i) for arg in ("--set", o)]
        subprocess.run([*speedrun, "train", "--preset", "tiny-2025", "--out", str(out / name), "--overwrite", *sets, *extra],
                       check=True)
    runs = [str(out / name) for name, _, _ in PIECES if (out / name / "summary.json").exists()]
    subprocess.run([*speedrun, "compare", *runs], check=True)
    subprocess.run([*speedrun, "plot", *runs, "--x", "time", "--no-train", "--out", str(out / "val-loss.png")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
