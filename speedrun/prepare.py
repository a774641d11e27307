"""Where the model meets the hardware: one pass, `prepare`, settles for a device and a use what the
model itself never asks about: the activation dtype, embedding tables in bf16, the FP8 head and
MLP, the prefix-token table of a prefix loss, torch.compile, and on CPU how host memory is allocated. Train, bench, evaluate and sample all go
through it, so a run and a later evaluation of its weights compute the same way."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from speedrun.config import Config, ModelConfig
from speedrun.data.corpus import cache_root
from speedrun.loss import LOSS_CHUNK_ROWS
from speedrun.mlp import MLP
from speedrun.model import GPT, Attention
from speedrun.prefix import gpt2_prefix_table

# train: training mode, compiled as train.compile says (compile_scope), FP8 head where enabled.
# eval: evaluation mode on batches of one shape, compiled on CUDA (FlexAttention's fused kernel).
# inference: evaluation mode, eager, for inputs whose shapes change at every call (sampling over a
# KV cache, HellaSwag's items), where a compiled model would recompile.
MODES = ("train", "eval", "inference")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), where bf16 activations
    make a tiny step 1.3-1.7x faster (docs/benchmarks.md); elsewhere torch emulates bf16 through
    float32 and would be slower. False where torch cannot tell (its probes are private)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def auto_dtype(device: torch.device) -> torch.dtype:
    """What "auto" means for activations and orthogonalisation: bf16 where its matmuls are fast (CUDA
    and CPUs with fast bf16), else float32."""
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else torch.float32


def activation_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """ModelConfig.activation_dtype, "auto" resolved by auto_dtype."""
    return auto_dtype(device) if cfg.activation_dtype == "auto" else getattr(torch, cfg.activation_dtype)


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmuls (torch._scaled_mm) on tensor cores: CUDA compute capability 8.9 (Ada) and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def uses_fp8_head(cfg: ModelConfig, device: torch.device) -> bool:
    return cfg.fp8_head == "on" or (cfg.fp8_head == "auto" and fp8_supported(device))


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far: Dynamo's own count of the FX graphs
    it handed to a backend (`torch._dynamo.utils.counters["stats"]["unique_graphs"]`), which grows
    by one for every first compile, recompile and graph-break fragment of any compiled function
    (model, FlexAttention, Newton–Schulz, FP8 op). A backward graph is compiled by AOTAutograd at
    its forward graph's first backward and is not counted on its own."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@functools.cache
def user_compile_cache() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as this process found it, read once: before
    use_persistent_compile_cache sets it, a directory the user chose."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_persistent_compile_cache() -> None:
    """Keep inductor's compiled kernels and graphs beside the corpus cache, so a second run of the
    same config skips most of compilation (torch's default lives in /tmp). Only effective before
    torch._dynamo is first imported: that import fixes TORCHINDUCTOR_CACHE_DIR (torch 2.13 sets
    it to the default if unset), so the CLI calls this first thing."""
    if user_compile_cache() is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


# glibc's mallopt parameters (malloc.h) and the environment variables a user sets them with
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_host_memory() -> bool:
    """Serve every host allocation from the heap and keep what is freed there, rather than mapping
    each large tensor fresh from the kernel and unmapping it when freed: a CPU step frees and
    allocates the same big buffers again (a tiny step's logits alone are 800 MB), and every fresh
    mapping is page-faulted in anew. A tiny step is 1.5x faster for about 50% more peak memory
    (docs/benchmarks.md); the values computed are the same. glibc only; a MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ the user set is left alone. Returns whether it took effect."""
    if sys.platform != "linux" or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def avoid_inductor_mix_order_reduction() -> None:
    """Turn off inductor's mix-order reduction (fusing a row and a column reduction of one tensor,
    as in a norm's backward), a CUDA-only fusion new in torch 2.10 with a run of open bugs: on
    torch 2.11 it aborts compiling the 2026 model (AssertionError "16384 v.s. 16383", a reduction
    over the sequence fused with one over all but its last token; pytorch#176375) and a later
    version was found to sum masked-out values (pytorch#196168). A user's TORCHINDUCTOR_MIX_ORDER_REDUCTION is left to decide."""
    import torch._inductor.config

    triton = torch._inductor.config.triton
    if hasattr(triton, "mix_order_reduction") and "TORCHINDUCTOR_MIX_ORDER_REDUCTION" not in os.environ:
        triton.mix_order_reduction = False


def trust_cpu_vector_isa() -> None:
    """Let inductor take the CPU's vector ISA (AVX-512, AVX2, ...) from the CPU's feature flags instead
    of first test-compiling ATen's vectorized headers once for every candidate ISA, in every process,
    and loading each result in a child process (inductor's `cpp.vec_isa_ok`). The ISA-specific
    probes (bf16, VNNI, AMX intrinsics) still run, so the flags chosen and the kernels compiled are
    the same. Measured on 2 cores (docs/benchmarks.md): the first compile of a process over an empty
    inductor cache 14 s -> 7 s, and about 0.8 s less in every process with a warm one. A user's
    TORCHINDUCTOR_VEC_ISA_OK is left to decide."""
    import torch._inductor.config

    if "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        torch._inductor.config.cpp.vec_isa_ok = True


def configure_compiler(device: torch.device) -> None:
    """What a process sets before its first compile for `device`: the persistent cache and, by
    device, the two inductor settings above."""
    use_persistent_compile_cache()
    if device.type == "cuda":
        avoid_inductor_mix_order_reduction()
    else:
        trust_cpu_vector_isa()


# what the "regions" scope compiles, as the log line and doctor name it
COMPILED_REGIONS = "the loss tail (by row chunks), q and k's norm and rotation, the relu² MLP's backward and the Adam update"


def compile_scope(cfg: Config, device: torch.device) -> str | None:
    """What training compiles: "model", "regions" or None (eager). "regions" is a few small graphs,
    each one compiled once and shared by every layer: the loss tail (LMHead: head matmul, softcap and
    cross-entropy, by row chunks for a plain next-token loss), q and k's norm and rotation, the relu²
    MLP's backward and, as whenever a run compiles, the Adam update. train.compile = "auto" compiles
    the model on CUDA and the regions on CPU. Measured for tiny on 2 cores (docs/benchmarks.md): each
    region costs one to three seconds of cold compile and saves about as much or more over the
    default run, and far more warm; the whole model costs about 80 s cold and 12-15 s warm for
    steps no faster than the regions' (its attention takes the dense mask and its loss tail is not
    chunked), so it does not pay, from a cold cache or a warm one."""
    if cfg.train.compile == "auto":
        return "model" if device.type == "cuda" else "regions"
    return "model" if cfg.train.compile else None


def prepare(model: GPT, cfg: Config, device: torch.device, mode: str, sequences_per_loss: int = 1) -> Callable:
    """Move `model` to `device`, set it up for `mode` (see MODES) and return the callable to run it
    with (the model, or its compiled wrapper). `sequences_per_loss` is how many sequences each
    backward's loss is the mean over, accumulation steps included: the FP8 gradient scale of
    ModelConfig.fp8_scales is for one sequence's mean loss, as each rank computes it in the record,
    so it is multiplied by this to put the logit gradients in the same FP8 range at any world size
    and micro-batch."""
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    m = cfg.model
    if device.type == "cpu":
        keep_freed_host_memory()
    model.to(device)
    model.activation_dtype = activation_dtype(m, device)
    if model.activation_dtype == torch.bfloat16 and m.bf16_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.bfloat16()
    training = mode == "train"
    if training and cfg.optim.hidden_weight_dtype == "bfloat16":
        # NorMuon keeps the low 16 bits of each fp32 master in its state (optim.hidden_weight_dtype)
        for p in model.param_groups().get("hidden", []):
            p.data = p.data.bfloat16()
    fp8 = training and uses_fp8_head(m, device)
    model.lm_head.fp8_scales = [*m.fp8_scales[:2], m.fp8_scales[2] * sequences_per_loss] if fp8 else None
    fp8_mlp = training and (m.fp8_mlp == "on" or (m.fp8_mlp == "auto" and fp8_supported(device)))
    scope = compile_scope(cfg, device) if training else "model" if mode == "eval" and device.type == "cuda" else None
    for module in model.modules():
        if isinstance(module, MLP):
            module.fp8 = fp8_mlp
        if isinstance(module, (MLP, Attention)):
            module.compiled = scope == "regions"
    if training and cfg.stages.prefix_weight_start:
        model.prefix_table = gpt2_prefix_table(model.padded_vocab).to(device)
    model.train(training)
    if scope is not None:
        configure_compiler(device)
    if scope == "model":
        return torch.compile(model, dynamic=False)
    if scope == "regions":
        model.lm_head.compile_tail(chunk_rows=LOSS_CHUNK_ROWS)
    return model
