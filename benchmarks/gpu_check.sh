#!/usr/bin/env bash
# Check a GPU machine end to end and print a Markdown block for docs/benchmarks.md.
#
#     bash benchmarks/gpu_check.sh
#
# Runs this checkout as it is (cd to the repo root, PYTHONPATH=., no install; PYTHON=... picks the
# interpreter, default `python`), one GPU, world size 1. Stages:
#   1. `python -m pytest -m gpu -v`: the CUDA tests; pass/fail/skip counts.
#   -  the built-in corpus (`speedrun data builtin`, built into $SPEEDRUN_CACHE if absent), whose
#      val split sets the validation of stage 4.
#   2. `speedrun bench --preset gpt2-speedrun --device cuda --json` on the built-in corpus: one GPU,
#      the first stage's 131,072-token batch as 8 accumulation steps of 16,384 tokens; median step
#      time over 10 steps after 2 warm-up steps, tokens/s, MFU, peak memory, and graphs compiled
#      during the timed steps (must be 0). Its warm-up compiles the first stage's graph only, on an
#      empty inductor cache, so its compile time is that graph's COLD one.
#   3. warm compile: the same bench in a fresh process reusing stage 2's cache (the same warm-up,
#      1 timed step).
#      Chosen over `bench --compile-latency`, which would compile cold a second time (minutes).
#   4. a 40-step `speedrun train` of gpt2-speedrun on the built-in corpus, validating every 20
#      steps on 2 sequences of 16,384 val tokens; passes if the final val loss is below step 0's.
#   5. environment: GPU name and driver, torch and CUDA versions, commit (marked if the tree is dirty).
# Each stage runs under `timeout`, and all of them inside one budget (SPEEDRUN_GPU_CHECK_BUDGET_S,
# default 560 s, so the script ends within 10 minutes): a stage gets the least of its own cap and
# what the budget leaves after the minimum the later stages need. A failing or timed-out stage is
# reported and the next one still runs; the exit status is 1 if any stage failed. At the end the
# script prints a Markdown block (date, device, torch, commit, the figures, every stage's status)
# to paste into docs/benchmarks.md under "GPU check". Logs stay in a temporary directory (printed)
# when a stage failed or SPEEDRUN_GPU_CHECK_KEEP=1; otherwise it is removed.
# The budget split rests on two partial H200 runs (docs/benchmarks.md, "GPU check"): if a stage times
# out, run again (the CUDA tests' compile cache is then warm; stage 2 always compiles cold, by
# design), and if it still does, raise SPEEDRUN_GPU_CHECK_BUDGET_S and say so with the figures.
#
# Dry run without a GPU, for developers changing this script:
#     SPEEDRUN_GPU_CHECK_DEVICE=cpu SPEEDRUN_GPU_CHECK_PRESET=tiny bash benchmarks/gpu_check.sh
# runs every stage on the CPU (stage 1 then only collects and skips the GPU tests) with 2 timed
# bench steps after 2 warm-up steps (tiny's Adam steps every other step, a graph of its own), a
# 6-step training run validating every 3 steps on 1,024-token sequences, and a 1,500 s budget
# (about 3 minutes on 2 cores). Its figures mean nothing; the
# Markdown block says DRY RUN.

set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset WORLD_SIZE RANK LOCAL_RANK  # one process, whatever launched us
PY=${PYTHON:-python}
DEVICE=${SPEEDRUN_GPU_CHECK_DEVICE:-cuda}
PRESET=${SPEEDRUN_GPU_CHECK_PRESET:-gpt2-speedrun}
KEEP=${SPEEDRUN_GPU_CHECK_KEEP:-0}

if [[ $DEVICE == cuda ]]; then
    BUDGET=${SPEEDRUN_GPU_CHECK_BUDGET_S:-560}
    BENCH_STEPS=10 BENCH_WARMUP=2 TRAIN_STEPS=40 VAL_EVERY=20 VAL_SEQ=16384 VAL_SEQS_MAX=2
    # seconds: each stage's cap, and the least it must be left when an earlier stage runs long.
    # Measured on an H200 (2026-11-26, torch 2.11): 15 GPU tests took 125 s in 3 processes, and a
    # cold warm-up of all three gpt2-speedrun stage graphs ran past 300 s. Stage 2 now compiles the
    # first stage's graph only; stage 4 (40 steps, scaled to three stages) takes it from stage 2's
    # cache and compiles the other two, so it gets the larger cap.
    CAP_TESTS=200 CAP_DATA=60 CAP_BENCH=300 CAP_WARM=60 CAP_TRAIN=250 CAP_ENV=30
    MIN_DATA=20 MIN_BENCH=180 MIN_WARM=30 MIN_TRAIN=60 MIN_ENV=10
elif [[ $DEVICE == cpu ]]; then
    BUDGET=${SPEEDRUN_GPU_CHECK_BUDGET_S:-1500}
    BENCH_STEPS=2 BENCH_WARMUP=2 TRAIN_STEPS=6 VAL_EVERY=3 VAL_SEQ=1024 VAL_SEQS_MAX=16
    CAP_TESTS=300 CAP_DATA=300 CAP_BENCH=600 CAP_WARM=300 CAP_TRAIN=600 CAP_ENV=60
    MIN_DATA=60 MIN_BENCH=200 MIN_WARM=60 MIN_TRAIN=200 MIN_ENV=15
else
    echo "gpu_check: SPEEDRUN_GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/speedrun-gpu-check.XXXXXX")
STATUS=$WORK/status.tsv
: >"$STATUS"
START=$(date +%s)
FAILED=0

cleanup() {
    if [[ $KEEP == 1 ]]; then
        echo "gpu_check: everything kept in $WORK" >&2
    elif [[ $FAILED == 1 ]]; then
        rm -rf "$WORK/run/checkpoints" "$WORK/inductor"  # GBs: a gpt2-speedrun checkpoint, compiled kernels
        echo "gpu_check: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# stage_timeout CAP MIN_AFTER: CAP, or less so that MIN_AFTER seconds of the budget stay for later stages
stage_timeout() {
    local left=$((BUDGET - ($(date +%s) - START) - $2))
    local t=$(($1 < left ? $1 : left))
    echo $((t < 5 ? 5 : t))
}

# run_stage ID "LABEL" CAP MIN_AFTER COMMAND...: stdout to $WORK/ID.out, stderr to $WORK/ID.err;
# appends "ID<TAB>LABEL<TAB>ok|failed (exit N)|timeout (Ns)|killed (...)<TAB>seconds" to $STATUS; returns the
# command's exit status
run_stage() {
    local id=$1 label=$2 cap=$3 after=$4
    shift 4
    local limit t0 rc status
    limit=$(stage_timeout "$cap" "$after")
    t0=$(date +%s)
    echo "gpu_check: [$label] started, timeout ${limit}s ($(($(date +%s) - START))s elapsed)" >&2
    timeout --kill-after=15 "$limit" "$@" >"$WORK/$id.out" 2>"$WORK/$id.err" && rc=0 || rc=$?
    if [[ $rc == 0 ]]; then
        status=ok
    elif [[ $rc == 124 ]]; then
        status="timeout (${limit}s)"
    elif [[ $rc == 137 ]]; then
        status="killed (a timeout of ${limit}s, or out of memory)"
    else
        status="failed (exit $rc)"
    fi
    printf '%s\t%s\t%s\t%s\n' "$id" "$label" "$status" "$(($(date +%s) - t0))" >>"$STATUS"
    echo "gpu_check: [$label] $status in $(($(date +%s) - t0))s" >&2
    if [[ $rc != 0 ]]; then
        FAILED=1
        tail -n 15 "$WORK/$id.err" "$WORK/$id.out" >&2 || true
    fi
    return $rc
}

# mark ID STATUS: overwrite a finished stage's status (a check after the command failed)
mark() {
    local id=$1 status=$2
    awk -F'\t' -v OFS='\t' -v id="$id" -v s="$status" '$1 == id { $3 = s } { print }' "$STATUS" >"$STATUS.new"
    mv "$STATUS.new" "$STATUS"
    FAILED=1
    echo "gpu_check: [$id] $status" >&2
}

# -- 1. the GPU tests ---------------------------------------------------------------------------
MIN_AFTER_TESTS=$((MIN_DATA + MIN_BENCH + MIN_WARM + MIN_TRAIN + MIN_ENV))
# Compiling is most of the tests' time and mostly one CPU core's work: with pytest-xdist, three
# processes share the GPU. Tracebacks go to tests.err as tests fail (tests/conftest.py).
PARALLEL=()
if [[ $DEVICE == cuda ]] && "$PY" -c 'import xdist' 2>/dev/null; then PARALLEL=(-n 3); fi
run_stage tests "1 pytest -m gpu" "$CAP_TESTS" "$MIN_AFTER_TESTS" \
    env SPEEDRUN_FAILURES_AT_ONCE=1 "$PY" -m pytest -m gpu -v -p no:cacheprovider "${PARALLEL[@]}" || true
if [[ $DEVICE == cuda ]] && ! grep -qE '[0-9]+ passed' "$WORK/tests.out"; then
    mark tests "failed (no GPU test passed)"
fi

# -- the built-in corpus and a validation that fits its val split -------------------------------
DATA_SETS=()
if run_stage data "data: built-in corpus" "$CAP_DATA" $((MIN_BENCH + MIN_WARM + MIN_TRAIN + MIN_ENV)) \
    "$PY" -m speedrun data builtin; then
    val_total=$(grep -oE '[0-9,]+ val tokens' "$WORK/data.out" | head -n 1 | tr -d ',' | cut -d' ' -f1 || true)
    if [[ -n $val_total ]] && ((val_total > 128)); then
        usable=$((val_total - 1))  # a sequence's targets need one token past it
        if ((usable < VAL_SEQ)); then VAL_SEQ=$((usable / 128 * 128)); fi
        n=$((usable / VAL_SEQ))
        ((n > VAL_SEQS_MAX)) && n=$VAL_SEQS_MAX
        VAL_TOKENS=$((n * VAL_SEQ))
        DATA_SETS=(--set 'data.dir=""' --set "data.val_seq_len=$VAL_SEQ" --set "data.val_tokens=$VAL_TOKENS")
        echo "gpu_check: built-in corpus: $val_total val tokens; validating on $VAL_TOKENS tokens in sequences of $VAL_SEQ" >&2
    else
        mark data "failed (no val token count in the output)"
    fi
fi

COMPILE_ENV=(env -u TRITON_CACHE_DIR "TORCHINDUCTOR_CACHE_DIR=$WORK/inductor")  # empty: stage 2 compiles cold
if ((${#DATA_SETS[@]})); then
    # -- 2. bench, cold compile ----------------------------------------------------------------
    if run_stage bench "2 bench $PRESET" "$CAP_BENCH" $((MIN_WARM + MIN_TRAIN + MIN_ENV)) \
        "${COMPILE_ENV[@]}" "$PY" -m speedrun bench --preset "$PRESET" --device "$DEVICE" --compile \
        --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" --json "${DATA_SETS[@]}"; then
        recompiles=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"][0]["recompiles"])' \
            "$WORK/bench.out" 2>/dev/null || echo "?")
        [[ $recompiles == 0 ]] || mark bench "failed ($recompiles graphs compiled during the timed steps)"
        # -- 3. warm compile: a fresh process on stage 2's cache -------------------------------
        run_stage warm "3 warm compile" "$CAP_WARM" $((MIN_TRAIN + MIN_ENV)) \
            "${COMPILE_ENV[@]}" "$PY" -m speedrun bench --preset "$PRESET" --device "$DEVICE" --compile \
            --steps 1 --warmup "$BENCH_WARMUP" --json "${DATA_SETS[@]}" || true
    else  # stage 2 did not fill the cache, so a "warm" compile would be partly cold
        printf '%s\t%s\t%s\t%s\n' warm "3 warm compile" "not run (stage 2 failed)" 0 >>"$STATUS"
    fi
    # -- 4. a short training run whose loss falls ----------------------------------------------
    if run_stage train "4 train $TRAIN_STEPS steps" "$CAP_TRAIN" "$MIN_ENV" \
        "${COMPILE_ENV[@]}" "$PY" -m speedrun train --preset "$PRESET" --device "$DEVICE" --compile \
        "${DATA_SETS[@]}" --set train.warmup_steps_untimed=1 --set data.allow_repeat=true \
        --steps "$TRAIN_STEPS" --val-every "$VAL_EVERY" \
        --out "$WORK/run"; then
        if ! "$PY" - "$WORK/run/metrics.jsonl" <<'EOF'; then
import json, sys
vals = [r for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r]
sys.exit(0 if len(vals) >= 2 and vals[-1]["val_loss"] < vals[0]["val_loss"] else 1)
EOF
            mark train "failed (final val loss not below step 0's)"
        fi
    fi
else
    for id in bench warm train; do
        printf '%s\t%s\t%s\t%s\n' "$id" "$id" "not run (no data)" 0 >>"$STATUS"
    done
    FAILED=1
fi

# -- 5. environment -----------------------------------------------------------------------------
environment() {
    if command -v nvidia-smi >/dev/null; then
        echo "gpus=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | paste -sd ';' -)"
    else
        echo "gpus="
    fi
    "$PY" -c 'import torch
print("torch=" + torch.__version__)
print("cuda=" + (torch.version.cuda or "none"))
print("device=" + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"))'
    echo "commit=$(git rev-parse --short HEAD)"
    echo "dirty=$(git status --porcelain | wc -l)"
}
export -f environment
export PY
run_stage env "5 environment" "$CAP_ENV" 0 bash -c environment || true

# -- the report -----------------------------------------------------------------------------------
"$PY" - "$WORK" "$DEVICE" "$PRESET" "$BUDGET" "$(($(date +%s) - START))" "${DATA_SETS[@]}" <<'EOF' || FAILED=1
import json, re, sys
from datetime import datetime, timezone
from pathlib import Path

work, device, preset, budget, elapsed, *sets = sys.argv[1:]
work = Path(work)


def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None


def bench(name):
    report = load(name)
    return report["results"][0] if report else None


env = dict(line.split("=", 1) for line in (work / "env.out").read_text().splitlines() if "=" in line) \
    if (work / "env.out").exists() else {}
status = [line.split("\t") for line in (work / "status.tsv").read_text().splitlines() if line]
cold, warm, summary = bench("bench.out"), bench("warm.out"), load("run/summary.json")
metrics = []
if (work / "run/metrics.jsonl").exists():
    metrics = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines() if line]
tests = ""
if (work / "tests.out").exists():
    lines = [l for l in (work / "tests.out").read_text().splitlines() if re.search(r" in [0-9.]+s", l)]
    tests = ", ".join(f"{n} {w}" for n, w in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                                       lines[-1])) if lines else ""
accum = ""
try:
    from speedrun.config import load_config
    from speedrun.stages import grad_accum, step_plan
    cfg = load_config(preset, None, [s for s in sets if s != "--set"])
    plan = step_plan(0, cfg)  # the bench times the first stage's steps
    accum = (f": grad accumulation over {grad_accum(plan, cfg, 1)} micro-steps of {cfg.data.micro_batch_seqs} × "
             f"{plan.seq_len:,} tokens")
except Exception:
    pass

na = "—"
rows = []
if cold:
    rows += [(f"`speedrun bench --preset {preset}`: step time, median of {cold['steps']} (world size "
              f"{cold['world_size']}, {cold['tokens_per_step']:,} tokens/step{accum})",
              f"{cold['step_ms']:,.1f} ms (min {cold['step_ms_min']:,.1f})"),
             ("tokens/s", f"{cold['tokens_per_s']:,.0f}"),
             ("MFU", f"{100 * cold['mfu']:.1f}%" if cold["mfu"] is not None else na),
             ("peak memory", f"{cold['peak_memory_mib']:,.0f} MiB"),
             ("graphs compiled during the timed steps (recompiles)", str(cold["recompiles"])),
             ("compile, cold (empty inductor cache)", f"{cold['compile_s']:.1f} s")]
if warm:
    rows.append(("compile, warm (fresh process, cache reused)", f"{warm['compile_s']:.1f} s"))
vals = [r for r in metrics if "val_loss" in r]
if len(vals) >= 2:  # else the run stopped before its second validation
    rows.append((f"`speedrun train` {vals[-1]['step']} steps on the built-in corpus: val loss, step 0 → {vals[-1]['step']}",
                 f"{vals[0]['val_loss']:.3f} → {vals[-1]['val_loss']:.3f}"))
if summary:
    steps = summary["steps"]
    tps = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    rows.append(("… its train time, step average, tokens/s, peak memory",
                 f"{summary['train_time_ms'] / 1000:.1f} s, {summary['train_time_ms'] / steps:,.1f} ms, "
                 f"{tps[-1]:,.0f}, {summary['peak_memory_mib']:,.0f} MiB" if tps else na))
if tests:
    rows.append(("`pytest -m gpu`", tests))

gpus = [g.strip() for g in env.get("gpus", "").split(";") if g.strip()]
if gpus:
    name, _, driver = gpus[0].rpartition(",")
    device_text = f"{name.strip()} ×{len(gpus)}, driver {driver.strip()}"
else:
    device_text = env.get("device", "unknown")
dirty = int(env.get("dirty", "0") or 0)
now = datetime.now(timezone.utc)
out = ["", "----- 8< ----- paste into docs/benchmarks.md, section \"GPU check\" -----", ""]
title = f"### GPU check, {now:%Y-%m-%d %H:%M} UTC"
if device != "cuda":
    title += f" — DRY RUN on {device} with `{preset}`: plumbing only, the figures mean nothing"
out += [title, "",
        f"- Device: {device_text}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}",
        f"- Commit: {env.get('commit', '?')}" + (f" with {dirty} uncommitted or untracked file(s)" if dirty else ""),
        f"- Command: `bash benchmarks/gpu_check.sh`, {elapsed} s in all (budget {budget} s)", "",
        "| figure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows], "",
        "| stage | status | seconds |", "| --- | --- | --- |", *[f"| {s[1]} | {s[2]} | {s[3]} |" for s in status],
        "", "----- >8 -----"]
print("\n".join(out))
EOF

exit $FAILED
