"""FP8 matmul for the lm_head, as a custom op so torch.compile treats it as one opaque call.

Forward: x and w are scaled, cast to float8_e4m3fn and multiplied by `torch._scaled_mm` (which
undoes the scales) into bf16. Backward: the output gradient is scaled and cast to float8_e5m2
(more range, less precision: gradients span many magnitudes) and both gradients come from
`_scaled_mm` too, reusing the FP8 copies of x and w that forward returned. The scales are fixed
per run (ModelConfig.fp8_scales = [x, w, grad]) and chosen so values fill the FP8 range: e4m3
tops out at 448 (past it torch 2.13 saturates; older versions may give NaN) and e5m2 overflows to
inf past 57344, so gradients must stay below 57344 / grad_scale (0.11 with the default 2^19; a
mean cross-entropy's are at most 1 / tokens), and below half of e5m2's smallest subnormal, 2^-17 /
grad_scale, they flush to zero. ModelConfig's grad scale is for one sequence's mean loss;
speedrun.prepare multiplies it by the sequences each backward's loss averages over (accumulation
steps × micro-batch), so the gradients this op sees, that many times smaller, get the same FP8
copy whatever the world size (bit for bit when that number is a power of two). `torch._scaled_mm`
also runs on CPU (every dtype combination used here), which the tests rely on; CUDA needs compute
capability >= 8.9 and dimensions that are multiples of 16.

The per-tensor helpers (amax_scale, to_e4m3, e4m3_matmul) are for speedrun.mlp, whose scales follow
the data rather than being fixed per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compiled_on_cuda(fn):
    """Run `fn` compiled on CUDA, where fusing each scale-and-cast into one kernel matters, and as
    is elsewhere. torch.compile is only touched at the first CUDA call: importing it costs seconds."""
    compiled = None

    def run(first: Tensor, *args):
        nonlocal compiled
        if not first.is_cuda:
            return fn(first, *args)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(first, *args)

    return run


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0


def amax_scale(t: Tensor) -> Tensor:
    """The per-tensor scale (fp32, 0-d) that maps t's largest magnitude onto E4M3_MAX; never 0, so an
    all-zero tensor (a zero-initialised projection) still divides safely."""
    return t.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX


def to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    """t / scale in float8_e4m3fn, clamped to ±E4M3_MAX first: a delayed scale can be too small for
    this call's values, and past the range older torch versions cast to NaN rather than saturate."""
    # contiguous: _scaled_mm on CUDA takes row-major operands only
    return (t.contiguous().float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e4m3_matmul(a8: Tensor, a_scale: Tensor, b8: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a8·a_scale) @ (b8·b_scale)^T for row-major e4m3 a8 (M, K) and b8 (N, K), accumulated fast."""
    # _scaled_mm wants its second operand column-major: the transpose of a row-major b8 is exactly that
    return torch._scaled_mm(a8, b8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype,
                            use_fast_accum=True)


def _inverse(scale: float, like: Tensor) -> Tensor:
    return torch.tensor(1.0 / scale, dtype=torch.float32, device=like.device)


def _forward(x: Tensor, w: Tensor, x_scale: float, w_scale: float):
    x8 = x.contiguous().mul(x_scale).to(torch.float8_e4m3fn)
    w8 = w.contiguous().mul(w_scale).to(torch.float8_e4m3fn)
    # _scaled_mm wants its second operand column-major: w8.t() of a row-major w8 is exactly that
    out = torch._scaled_mm(x8, w8.t(), scale_a=_inverse(x_scale, x), scale_b=_inverse(w_scale, x),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out, x8, w8


def _backward(grad: Tensor, x8: Tensor, w8: Tensor, x_scale: float, w_scale: float, grad_scale: float):
    g8 = grad.contiguous().mul(grad_scale).to(torch.float8_e5m2)
    g_inv = _inverse(grad_scale, grad)
    grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_inv, scale_b=_inverse(w_scale, grad),
                              out_dtype=torch.bfloat16, use_fast_accum=False)
    # (x^T g)^T rather than g^T x: the same product, and the faster layout for a wide vocab
    grad_w = torch._scaled_mm(x8.t().contiguous(), g8.t().contiguous().t(), scale_a=_inverse(x_scale, grad),
                              scale_b=g_inv, out_dtype=torch.float32, use_fast_accum=False).t()
    return grad_x, grad_w


_forward_impl = compiled_on_cuda(_forward)
_backward_impl = compiled_on_cuda(_backward)


@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) @ w (N, K)^T -> (bf16 (M, N), x in FP8, w in FP8); the last two feed backward."""
    return _forward_impl(x, w, x_scale, w_scale)


@fp8_mm.register_fake
def _(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.float8_e4m3fn, memory_format=torch.contiguous_format),
            torch.empty_like(w, dtype=torch.float8_e4m3fn, memory_format=torch.contiguous_format))


@torch.library.custom_op("speedrun::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(grad: Tensor, x8: Tensor, w8: Tensor, x_scale: float, w_scale: float,
                    grad_scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of fp8_mm: (grad_x in bf16, grad_w in fp32)."""
    return _backward_impl(grad, x8, w8, x_scale, w_scale, grad_scale)


@fp8_mm_backward.register_fake
def _(grad: Tensor, x8: Tensor, w8: Tensor, x_scale: float, w_scale: float, grad_scale: float):
    return (x8.new_empty(x8.shape, dtype=torch.bfloat16),
            w8.new_empty(w8.shape[::-1], dtype=torch.float32).t())


def _setup_context(ctx, inputs, output):
    *_, x_scale, w_scale, grad_scale = inputs
    _, x8, w8 = output
    ctx.save_for_backward(x8, w8)
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_out: Tensor, *_unused_fp8_grads):
    x8, w8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.speedrun.fp8_mm_backward(grad_out, x8, w8, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_autograd_backward, setup_context=_setup_context)


def fp8_linear(x: Tensor, w: Tensor, scales: Sequence[float]) -> Tensor:
    """x (..., K) @ w (N, K)^T in FP8 -> bf16 (..., N). `scales` = (x_scale, w_scale, grad_scale)."""
    x_scale, w_scale, grad_scale = scales
    out = torch.ops.speedrun.fp8_mm(x.flatten(0, -2), w, x_scale, w_scale, grad_scale)[0]
    return out.view(*x.shape[:-1], out.size(-1))
