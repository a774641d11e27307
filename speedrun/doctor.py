"""`speedrun doctor`: check the environment before a long run and print what the run will use.

Each check is a generator of (status, text) lines, status one of "ok", "FAIL" or "info". Lines are
printed as they come, so a slow step (building the built-in corpus, compiling FlexAttention) shows
what it is doing before it starts. A check that raises is reported as one FAIL line carrying the
exception's first line, and the checks after it still run; the command exits 1 if any line failed.

Under torchrun every rank runs every check (each GPU gets its own self-test and joins the
all-reduce), only rank 0 prints, and before the process group is torn down rank 0 collects and
prints the other ranks' failures. torch and the package's heavy modules are imported inside the
functions: the CLI imports this module for every command.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from speedrun.config import add_config_arguments, config_from_args, default_preset

OK, FAIL, INFO = "ok", "FAIL", "info"
Line = tuple[str, str]

MIN_TORCH = (2, 9)
# The attention self-test: one sequence of T tokens, block size 128, a few documents.
SELFTEST_T, SELFTEST_HEADS, SELFTEST_DIM, SELFTEST_BLOCK = 256, 2, 32, 128
SELFTEST_BOS = [0, 77, 128, 200]  # a document boundary on a block edge and two inside blocks
FP8_TOLERANCE = 0.1  # e4m3 rounding alone gives about 0.04 relative error on this matmul

# Command-line flags that are shorthands for one config key each (as in `speedrun train`).
FLAG_KEYS = {"data": "data.dir", "device": "train.device"}


@dataclass
class Context:
    """What the checks share: the resolved config, the torchrun layout, and the device once the
    device check has picked it (None if that failed, and the checks that need it are skipped)."""

    cfg: object
    label: str
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))
    device: object = None
    failures: list[str] = field(default_factory=list)


def _first_line(e: BaseException) -> str:
    from speedrun.errors import SpeedrunError, first_line

    # our own errors are written to be read as they are; anything else needs its type to make sense
    text = first_line(e)
    return text if isinstance(e, SpeedrunError) or text == type(e).__name__ else f"{type(e).__name__}: {text}"


def _torch_version_ok(version: str) -> bool:
    try:
        major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return True  # an unparseable (source) build: assume the user knows what they built
    return (major, minor) >= MIN_TORCH


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # absent, or present but broken: either way torch.compile cannot use it
        return None
    return getattr(triton, "__version__", "unknown version")


# -- 1. versions ------------------------------------------------------------------------------------

def check_versions(ctx: Context) -> Iterator[Line]:
    import torch

    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"CUDA {cuda}",
             f"cuDNN {cudnn or 'none'}"]
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        # the version only: touching a GPU here would open a context on GPU 0 from every rank
        parts.append("NCCL " + ".".join(str(v) for v in torch.cuda.nccl.version()))
    parts.append(f"Triton {_triton_version() or 'not installed'}")
    if not _torch_version_ok(torch.__version__):
        need = ".".join(map(str, MIN_TORCH))
        yield FAIL, f"versions: torch {torch.__version__} is too old: speedrun needs torch ≥ {need}"
    yield OK, "versions: " + ", ".join(parts)


# -- 2. device --------------------------------------------------------------------------------------

def check_device(ctx: Context) -> Iterator[Line]:
    import torch

    from speedrun.distributed import pick_device

    device = pick_device(ctx.cfg.train.device, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # as the run does: later checks' kernels must land on this rank's GPU
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        ctx.device = device
        yield OK, (f"device: {device} {props.name}, compute capability {props.major}.{props.minor}, "
                   f"{total / 2**30:.1f} GiB memory ({free / 2**30:.1f} GiB free), "
                   f"{torch.cuda.device_count()} GPU(s) visible")
        return
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ctx.device = device
    yield OK, (f"device: {device} ({platform.machine()}), {cores} cores ({usable} usable by this process), "
               f"torch uses {torch.get_num_threads()} threads (train.device = {ctx.cfg.train.device})")


# -- 3. dtype and head ------------------------------------------------------------------------------

def check_dtype(ctx: Context) -> Iterator[Line]:
    import torch

    from speedrun.prepare import activation_dtype, fp8_supported

    dtype = activation_dtype(ctx.cfg.model, ctx.device)
    name = str(dtype).removeprefix("torch.")
    cuda = ctx.device.type == "cuda"
    if dtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        yield FAIL, (f"dtype: activations {name}, but this GPU has no bfloat16 support "
                     "(set model.activation_dtype=float32)")
    else:
        why = ""
        if ctx.cfg.model.activation_dtype == "auto" and ctx.device.type == "cpu":
            why = ": this CPU multiplies bf16 in hardware" if dtype == torch.bfloat16 else \
                ": this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be emulated"
        yield OK, f"dtype: activations {name} (model.activation_dtype = {ctx.cfg.model.activation_dtype}{why})"
    mode, supported = ctx.cfg.model.fp8_head, fp8_supported(ctx.device)
    if mode == "on" and cuda and not supported:
        yield FAIL, ("head: model.fp8_head = on, but this GPU has no FP8 matmuls (needs compute capability ≥ 8.9); "
                     "set model.fp8_head=auto")
    elif mode == "on" or (mode == "auto" and supported):
        yield OK, f"head: FP8 lm_head in training (model.fp8_head = {mode}), {name} in evaluation"
    else:
        why = "model.fp8_head = off" if mode == "off" else "FP8 needs a CUDA GPU with compute capability ≥ 8.9"
        yield INFO, f"head: {name} lm_head matmul ({why})"


# -- 4. attention -----------------------------------------------------------------------------------

def check_attention(ctx: Context) -> Iterator[Line]:
    from speedrun.attention import use_flex
    from speedrun.stages import window_at

    m, steps = ctx.cfg.model, ctx.cfg.train.steps
    if use_flex(m, ctx.cfg.data.seq_len, ctx.device):
        yield INFO, f"attention: FlexAttention with block-sparse masks, block {m.window_block}"
    else:
        why = ("model.attention = sdpa" if m.attention == "sdpa" else
               f"FlexAttention has no backward on {ctx.device.type}" if ctx.device.type in ("cpu", "mps") else
               f"data.seq_len {ctx.cfg.data.seq_len} is not whole {m.window_block}-token blocks")
        yield INFO, f"attention: SDPA with dense masks, short windows by chunks of queries ({why})"
    docs = "document masks" if m.document_mask else "no document masks"
    if not m.sliding_window:
        yield INFO, f"attention: causal, {docs}, no sliding window"
        return
    rule = ("a query block sees its nearest window/block key blocks" if m.window_granularity == "block"
            else "query - key < window, exact per token")
    schedule = "stage windows" if ctx.cfg.stages.windows else f"'{m.window_schedule}' schedule"
    short = "S layers their own" if ctx.cfg.stages.windows else "S layers half"
    yield INFO, (f"attention: {docs}; window rule '{m.window_granularity}' ({rule}; {short}); "
                 f"{schedule} {window_at(0, ctx.cfg)[0]} → {window_at(steps, ctx.cfg)[0]} tokens over {steps} steps")


def _selftest_inputs(ctx: Context, dtype):
    """q, k, v, the document ids and the window tensor (int32 on the device, as the trainer passes it)."""
    import torch

    from speedrun.attention import NO_WINDOW, document_ids
    from speedrun.data.tokenizer import EOT

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, EOT, (1, SELFTEST_T), generator=g)
    idx[0, SELFTEST_BOS] = EOT
    docs = document_ids(idx).to(ctx.device) if ctx.cfg.model.document_mask else None
    # block rule: L layers see both blocks, S layers one; token rule: 200 is not whole blocks
    size = (256 if ctx.cfg.model.window_granularity == "block" else 200) if ctx.cfg.model.sliding_window else NO_WINDOW
    window = torch.tensor(size, dtype=torch.int32, device=ctx.device)
    shape = (1, SELFTEST_HEADS, SELFTEST_T, SELFTEST_DIM)
    qkv = [torch.randn(shape, generator=g).to(ctx.device, dtype).requires_grad_() for _ in range(3)]
    return qkv, docs, window


def _errors(out, grads, qkv, allowed, scale: float, dout) -> tuple[float, float | None]:
    """Max abs error of the output against an unfused float64 softmax over the masked scores, and of
    the q/k/v gradients relative to the largest reference gradient (None without backward)."""
    import torch

    ref_in = [t.detach().double().requires_grad_(grads is not None) for t in qkv]
    scores = (ref_in[0] @ ref_in[1].transpose(-1, -2)) * scale
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ ref_in[2]
    out_err = (out.detach().double() - ref).abs().max().item()
    if grads is None:
        return out_err, None
    ref.backward(dout.double())
    scale_g = max(r.grad.abs().max().item() for r in ref_in)
    return out_err, max((g.double() - r.grad).abs().max().item() for g, r in zip(grads, ref_in)) / scale_g


def _run_attention(fn, qkv, backward: bool, dout):
    import torch

    if not backward:
        with torch.no_grad():  # flex_attention refuses inputs that require grad where it has no backward
            return fn(*(t.detach() for t in qkv)), None
    out = fn(*qkv)
    return out, torch.autograd.grad(out, qkv, dout)


@dataclass
class _SelfTest:
    """One self-test set-up: inputs, FlexAttention masks and tolerances for the run's device and dtype."""

    qkv: list
    docs: object
    window: object
    dout: object
    masks: dict
    block: int | None
    tol: float
    grad_tol: float
    where: str


def _selftest_setup(ctx: Context) -> _SelfTest:
    import torch

    from speedrun.attention import VARLEN, flex_masks
    from speedrun.prepare import activation_dtype

    m = ctx.cfg.model
    dtype = activation_dtype(m, ctx.device)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3 if ctx.device.type == "cuda" else 1e-4
    qkv, docs, window = _selftest_inputs(ctx, dtype)
    dout = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype)
    masks = flex_masks(docs, window, SELFTEST_T, SELFTEST_BLOCK, ctx.device, m.window_granularity)
    where = (f"{ctx.device.type}, {str(dtype).removeprefix('torch.')}, T={SELFTEST_T}, "
             + (f"{len(SELFTEST_BOS)} documents" if docs is not None else "no document mask"))
    return _SelfTest(qkv, docs, window, dout, masks, {"block": SELFTEST_BLOCK, "varlen": VARLEN}.get(m.window_granularity),
                     tol, 5e-2 if dtype == torch.bfloat16 else tol, where)


def _selftest_backend(ctx: Context, t: _SelfTest, name: str, attention: Callable, backward: bool,
                      timed_as: str = "first calls", extra_s: float = 0.0) -> Line:
    """Run `attention(q, k, v, letter, allowed)` for the long and the short window against the
    dense reference; one line with the worst errors and the time of the first calls."""
    import torch

    from speedrun.attention import SHRINK, dense_mask

    scale = SELFTEST_DIM ** -0.5
    worst, worst_grad, seconds = 0.0, 0.0, extra_s
    for letter, shrink in SHRINK.items():
        allowed = dense_mask(t.docs, t.window, shrink, 1, SELFTEST_T, ctx.device, t.block)
        t0 = time.perf_counter()
        out, grads = _run_attention(lambda q, k, v: attention(q, k, v, letter, allowed, scale), t.qkv, backward, t.dout)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds += time.perf_counter() - t0
        err, grad_err = _errors(out, grads, t.qkv, allowed, scale, t.dout)
        worst, worst_grad = max(worst, err), max(worst_grad, grad_err or 0.0)
    failed = worst > t.tol or (backward and worst_grad > t.grad_tol)
    what = "forward + backward" if backward else "forward only (no backward on CPU)"
    grads_text = f", gradients {worst_grad:.1e} of their max (tolerance {t.grad_tol:.0e})" if backward else ""
    return (FAIL if failed else OK), (f"attention self-test: {name} {what} on {t.where}: max abs error {worst:.1e} "
                                      f"(tolerance {t.tol:.0e}){grads_text}; {timed_as} {seconds:.1f}s")


def check_attention_selftest(ctx: Context) -> Iterator[Line]:
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from speedrun.attention import attend

    if ctx.cfg.train.compile:
        from speedrun.prepare import configure_compiler
        configure_compiler(ctx.device)  # as the run does, so that a second doctor run compiles from cache
    t = _selftest_setup(ctx)
    t0 = time.perf_counter()
    compiled = torch.compile(flex_attention, dynamic=False)  # timed too: it imports the compiler, seconds
    def flex(q, k, v, letter, allowed, scale):
        return compiled(q, k, v, block_mask=t.masks[letter], scale=scale)

    yield _selftest_backend(ctx, t, "compiled FlexAttention", flex,
                            backward=ctx.device.type == "cuda",  # torch 2.13 has no FlexAttention backward on CPU
                            timed_as="compile + first calls", extra_s=time.perf_counter() - t0)
    yield _selftest_backend(ctx, t, "SDPA", lambda q, k, v, letter, allowed, scale: attend(q, k, v, allowed, scale),
                            backward=True)


# -- 5. FP8 -----------------------------------------------------------------------------------------

def check_fp8(ctx: Context) -> Iterator[Line]:
    import torch

    from speedrun.fp8 import fp8_linear
    from speedrun.prepare import activation_dtype, fp8_supported

    m = ctx.cfg.model
    if not (m.fp8_head == "on" or (m.fp8_head == "auto" and fp8_supported(ctx.device))):
        name = str(activation_dtype(m, ctx.device)).removeprefix("torch.")
        yield INFO, f"fp8: no FP8 on this run ({name} head)"
        return
    g = torch.Generator().manual_seed(0)
    # magnitudes as in the model: rms-normed activations and the head's uniform init
    x = torch.randn(64, 128, generator=g).to(ctx.device, activation_dtype(m, ctx.device))
    w = ((torch.rand(256, 128, generator=g) * 2 - 1) * 3 ** 0.5 * 0.5 * 128 ** -0.5).to(ctx.device)
    out = fp8_linear(x, w, m.fp8_scales).double()
    ref = x.double() @ w.double().T
    rel = ((out - ref).norm() / ref.norm()).item()
    status = OK if rel <= FP8_TOLERANCE else FAIL
    yield status, (f"fp8: fp8_linear (64×128 @ 256×128, scales {m.fp8_scales[:2]}) on {ctx.device.type}: relative "
                   f"error {rel:.3f} against a float matmul (tolerance {FP8_TOLERANCE})")


# -- 6. distributed and the global batch -------------------------------------------------------------

def check_distributed(ctx: Context) -> Iterator[Line]:
    if ctx.world_size <= 1:
        yield INFO, "distributed: single process (run under torchrun to test the process group)"
        return
    import torch
    import torch.distributed as dist

    from speedrun.distributed import setup

    rt = setup(ctx.cfg.train.device)
    total = torch.tensor([rt.rank], dtype=torch.int64, device=rt.device)
    dist.all_reduce(total)
    expected = rt.world_size * (rt.world_size - 1) // 2
    # a second all-reduce, so that rank 0 knows every rank got the right sum, not only itself
    agreed = torch.tensor([int(total.item() == expected)], dtype=torch.int64, device=rt.device)
    dist.all_reduce(agreed)
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
    where = f"backend {dist.get_backend()}, world size {rt.world_size} ({per_node} per node)"
    if agreed.item() != rt.world_size:
        yield FAIL, (f"distributed: {where}: the all-reduce of the ranks gave {expected} = W(W-1)/2 on only "
                     f"{agreed.item()} of {rt.world_size} ranks (this rank got {total.item()})")
    else:
        yield OK, f"distributed: {where}: all-reduce of the ranks gives {expected} = W(W-1)/2 on every rank"


def check_batch(ctx: Context) -> Iterator[Line]:
    from speedrun.stages import grad_accum, shape_steps, step_plan

    d = ctx.cfg.data
    for step in shape_steps(ctx.cfg):
        plan = step_plan(step, ctx.cfg)
        accum = grad_accum(plan, ctx.cfg, ctx.world_size)
        when = f" from step {step}" if ctx.cfg.stages.ends else ""
        yield OK, (f"batch{when}: {plan.batch_tokens:,} tokens per step = world size {ctx.world_size} × "
                   f"{d.micro_batch_seqs} sequence(s) × seq_len {plan.seq_len:,} × {accum} grad accumulation step(s)")


# -- 7. data ----------------------------------------------------------------------------------------

def _find(folder, cfg) -> tuple[list, list, list[str]]:
    """(train files, val files, problems): find_shards stops at the first kind it misses, so when
    it fails each kind is looked at again to name every missing one."""
    from speedrun.data.loader import find_shards
    from speedrun.errors import DataError

    try:
        return *find_shards(folder, cfg.data.train_pattern, cfg.data.val_pattern), []
    except DataError as e:
        if not folder.is_dir():
            return [], [], [str(e)]
    return [], [], [f"no {kind} shards matching '{pattern}' in {folder}"
                    for kind, pattern in (("train", cfg.data.train_pattern), ("val", cfg.data.val_pattern))
                    if not any(p.is_file() for p in folder.glob(pattern))]


def _count_tokens(files) -> tuple[int, list[str]]:
    """Tokens in the shards whose headers check out, and one problem per damaged shard."""
    from speedrun.data.shards import read_header
    from speedrun.errors import DataError

    total, problems = 0, []
    for f in files:
        try:
            total += read_header(f)
        except DataError as e:
            problems.append(str(e))
    return total, problems


def check_data(ctx: Context) -> Iterator[Line]:
    from pathlib import Path

    from speedrun.data.corpus import builtin_corpus_dir, cache_root, corpus_name

    if ctx.cfg.data.dir:
        folder = Path(ctx.cfg.data.dir)
    else:
        if not (cache_root() / corpus_name() / "manifest.json").is_file():
            yield INFO, (f"data: building the built-in corpus in {cache_root() / corpus_name()} "
                         "(first use only; this takes a while)")
        folder = builtin_corpus_dir()
    train, val, problems = _find(folder, ctx.cfg)
    yield from ((FAIL, f"data: {p}") for p in problems)
    if problems:
        return
    train_tokens, bad_train = _count_tokens(train)
    val_tokens, bad_val = _count_tokens(val)
    yield from ((FAIL, f"data: {p}") for p in bad_train + bad_val)
    yield INFO, (f"data: {folder}: {len(train)} train shard(s), {train_tokens:,} tokens; "
                 f"{len(val)} val shard(s), {val_tokens:,} tokens")
    yield from _enough_tokens(ctx, train_tokens, val_tokens)


def _enough_tokens(ctx: Context, train_tokens: int, val_tokens: int) -> Iterator[Line]:
    from speedrun.train import tokens_needed

    d, steps = ctx.cfg.data, ctx.cfg.train.steps
    needed, val_needed = tokens_needed(ctx.cfg)
    passes = needed / train_tokens if train_tokens else float("inf")
    run = f"the {steps} staged steps' {needed:,}" if ctx.cfg.stages.ends else f"{steps} steps × {d.batch_tokens:,} = {needed:,}"
    if train_tokens >= needed:
        yield OK, f"data: train holds {train_tokens:,} tokens ≥ {run} ({passes:.2f} of one pass)"
    elif d.allow_repeat:
        yield INFO, (f"data: train holds {train_tokens:,} tokens < {run}: the run repeats the data {passes:.1f} times "
                     "(data.allow_repeat = true)")
    else:
        yield FAIL, (f"data: train holds {train_tokens:,} tokens < {run}: the run would make {passes:.1f} passes "
                     "over the data, which speedrun train refuses unless data.allow_repeat = true")
    if d.val_tokens < d.val_seq_len:
        yield FAIL, (f"data: data.val_tokens ({d.val_tokens:,}) holds no whole sequence of "
                     f"data.val_seq_len ({d.val_seq_len:,})")
        return
    what = f"{val_needed:,} that data.val_tokens = {d.val_tokens:,} needs"
    if val_tokens >= val_needed:
        yield OK, f"data: val holds {val_tokens:,} tokens ≥ {what}"
    else:
        yield FAIL, f"data: val holds {val_tokens:,} tokens < {what}"


# -- 8. compile -------------------------------------------------------------------------------------

def check_compile(ctx: Context) -> Iterator[Line]:
    from speedrun.prepare import COMPILED_REGIONS, compile_scope, use_persistent_compile_cache, user_compile_cache

    scope = compile_scope(ctx.cfg, ctx.device) if ctx.device is not None else "model"
    if scope is None:
        yield INFO, "compile: off (train.compile = false): the model runs eagerly"
        return

    use_persistent_compile_cache()
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    source = "from TORCHINDUCTOR_CACHE_DIR" if user_compile_cache() else "$SPEEDRUN_CACHE/inductor"
    if ctx.device is not None and ctx.device.type == "cuda" and _triton_version() is None:
        yield FAIL, "compile: on, but Triton is not importable: torch.compile cannot generate CUDA kernels"
    try:
        os.makedirs(cache, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        yield FAIL, f"compile: the inductor cache {cache} is not writable"
        return
    what = f"{COMPILED_REGIONS} only (train.compile = auto on CPU)" if scope == "regions" else "the model"
    yield OK, (f"compile: on, {what} (torch.compile; {ctx.cfg.train.warmup_steps_untimed} untimed warm-up steps); "
               f"inductor cache {cache} ({source})")


# -- the command ------------------------------------------------------------------------------------

# (check, needs the device the device check picked)
CHECKS: list[tuple[str, Callable[[Context], Iterator[Line]], bool]] = [
    ("versions", check_versions, False),
    ("device", check_device, False),
    ("dtype", check_dtype, True),
    ("attention", check_attention, True),
    ("attention self-test", check_attention_selftest, True),
    ("fp8", check_fp8, True),
    ("distributed", check_distributed, False),
    ("batch", check_batch, False),
    ("data", check_data, False),
    ("compile", check_compile, False),
]


def run_checks(ctx: Context, emit: Callable[[str, str], None], checks=None) -> None:
    for name, check, needs_device in CHECKS if checks is None else checks:
        if needs_device and ctx.device is None:
            emit(INFO, f"{name}: skipped (no device)")
            continue
        try:
            for status, text in check(ctx):
                emit(status, text)
        except Exception as e:  # one line per failed check, never a traceback; the rest still run
            emit(FAIL, f"{name}: {_first_line(e)}")


def _other_ranks_failures(ctx: Context) -> list[str]:
    """The other ranks' FAIL lines that this rank did not also report (empty outside a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return []
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ctx.failures)
    return [f"rank {rank}: {text}" for rank, lines in enumerate(gathered) if rank != ctx.rank
            for text in lines if text not in ctx.failures]


def resolve(args: argparse.Namespace):
    """(config, label) from the command line, as `speedrun train` resolves them."""
    label = args.preset or args.config or f"{default_preset()} (the default preset here)"
    return config_from_args(args, FLAG_KEYS), label


def _cmd_doctor(args: argparse.Namespace) -> int:
    cfg, label = resolve(args)
    ctx = Context(cfg, label)

    def emit(status: str, text: str) -> None:
        if status == FAIL:
            ctx.failures.append(text)
        if ctx.rank == 0:
            print(f"{status:<6}{text}", flush=True)

    t, d = cfg.train, cfg.data
    shape = (f"in {len(cfg.stages.ends) + 1} stages, each with its own batch and seq_len (speedrun schedule lists them)"
             if cfg.stages.ends else f"× {d.batch_tokens:,} tokens, seq_len {d.seq_len:,}")
    emit(INFO, f"config: {label}: {t.steps} steps {shape}, device {t.device}")
    try:
        run_checks(ctx, emit)
        _finish(ctx, emit)
    finally:
        from speedrun.distributed import teardown
        teardown()
    return 1 if ctx.failures else 0


def _finish(ctx: Context, emit: Callable[[str, str], None]) -> None:
    """Report the other ranks' failures and the summary, then wait for every rank: torchrun stops
    the remaining ranks as soon as one exits non-zero, which could cut rank 0's report short."""
    from speedrun.distributed import barrier

    try:
        for text in _other_ranks_failures(ctx):
            emit(FAIL, text)
    except Exception as e:
        emit(FAIL, f"distributed: collecting the other ranks' results: {_first_line(e)}")
    if ctx.rank == 0:
        # no status column: the FAIL lines above are the problems, one each
        failed = len(ctx.failures)
        print(f"doctor: {failed} problem(s) found" if failed else "doctor: all checks passed", flush=True)
    try:
        barrier()
    except Exception:
        pass  # the report is out; a rank that cannot reach the barrier changes nothing in it


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check the environment and print what a run will use",
                       description="Check versions, device, dtype, attention (with a compiled FlexAttention "
                                   "self-test), FP8, the process group (under torchrun), the data and the compile "
                                   "cache for a config, one line per check. Exits 1 if any check fails.")
    add_config_arguments(p)
    p.add_argument("--data", help="directory of .bin shards (default: the config's data.dir; empty: the built-in "
                                  "corpus)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_doctor)
