"""The transformer's MLP, act(x W1ᵀ + b1) W2ᵀ + b2 with W1 `fc` and W2 `proj`, and the two ways
the 2026 record makes its relu² form cheaper to train (../shared/docs/record-2026.md §3, M1 and M2).

- Plain: autograd over linear, activation (gelu, tanh form, or relu²), linear. Evaluation always
  runs it, and it is the only form for gelu.
- M1, ModelConfig.mlp_recompute: autograd alone keeps the pre-activation u = x W1ᵀ + b1, relu(u) and
  h = relu(u)² for backward. ReluSquaredMLP keeps only x and h: relu(u) = sqrt(h), so
  dh/du = 2·sqrt(h), and the (tokens × 4·model_dim) u and relu(u) are never stored.
- M2, ModelConfig.fp8_mlp, training only: both matmuls in float8_e4m3fn through torch._scaled_mm,
  each operand with one scale per tensor. x, W1 and W2 are scaled by their own amax / 448 at every
  call (the record quantises the weights once after each optimizer step; from the weights here
  they can never go stale, for two small reductions per layer and call). h is scaled before its
  amax is known: by the delayed amax in the `h_amax` buffer (h's amax at the previous training
  forward of this module) × fp8_mlp_headroom / 448, so values above h_amax × headroom saturate at
  448; a first call (h_amax = 0) uses its own amax in its place. Each training forward then stores
  its own amax of h there, so with gradient accumulation it is the previous micro-batch's. The
  buffer is persistent: a checkpoint carries it, and a resumed run quantises as the uninterrupted
  one. Backward is straight-through, in the activation dtype: M1's formulas with the unquantised
  x, W1, W2 and the h this forward computed (from the FP8 up-projection, before it was quantised
  for the down one), as the record does, which costs no extra matmul.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.fp8 import E4M3_MAX, amax_scale, compiled_on_cuda, e4m3_matmul, to_e4m3


def _relu2_grad(grad_h: Tensor, h: Tensor) -> Tensor:
    """The gradient at u from the gradient at h = relu(u)²: grad_h·2·relu(u), with relu(u) = sqrt(h)
    in fp32 (bf16's sqrt would round relu(u) a second time)."""
    return (grad_h.float() * h.float().sqrt() * 2).to(grad_h.dtype)


@functools.cache
def _compiled_relu2_grad():
    # One pass instead of five, and inductor's vectorised sqrt: eager sqrt on this 2-core CPU takes 7x
    # as long over zeros, half of h, as over positive values (1.6 ms against 0.11 a layer compiled)
    return torch.compile(_relu2_grad, dynamic=False)


def _relu2_mlp_grads(grad: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, b1_grad: bool, b2_grad: bool,
                     compiled: bool = False):
    """Gradients (x, W1, b1, W2, b2) of relu(x W1ᵀ + b1)² W2ᵀ + b2 from h = relu(x W1ᵀ + b1)² alone;
    a bias's is None unless asked for; `compiled`: the elementwise part compiled."""
    g, x2, h2 = grad.flatten(0, -2), x.flatten(0, -2), h.flatten(0, -2)
    du = (_compiled_relu2_grad() if compiled else _relu2_grad)(g @ w2, h2)
    grad_b1 = du.sum(0) if b1_grad else None
    grad_b2 = g.sum(0) if b2_grad else None
    return (du @ w1).view(x.shape), du.t() @ x2, grad_b1, g.t() @ h2, grad_b2


class ReluSquaredMLP(torch.autograd.Function):
    """M1: relu(x W1ᵀ + b1)² W2ᵀ + b2, every tensor in x's dtype, keeping x and h for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                compiled: bool = False) -> Tensor:
        h = F.relu(F.linear(x, w1, b1)).square()
        ctx.save_for_backward(x, w1, w2, h)
        ctx.compiled = compiled
        return F.linear(h, w2, b2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = _relu2_mlp_grads(grad, *ctx.saved_tensors, ctx.needs_input_grad[2], ctx.needs_input_grad[4], ctx.compiled)
        return *grads, None


def _fp8_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, h_amax: Tensor,
                 headroom: float):
    x_scale, w1_scale, w2_scale = amax_scale(x), amax_scale(w1), amax_scale(w2)
    u = e4m3_matmul(to_e4m3(x, x_scale), x_scale, to_e4m3(w1, w1_scale), w1_scale, x.dtype)
    h = F.relu(u if b1 is None else u + b1).square()
    amax = h.amax().float().clamp(min=1e-12)  # h >= 0; never 0, which h_amax reserves for "unset"
    h_scale = torch.where(h_amax > 0, h_amax, amax) * (headroom / E4M3_MAX)
    out = e4m3_matmul(to_e4m3(h, h_scale), h_scale, to_e4m3(w2, w2_scale), w2_scale, x.dtype)
    return out if b2 is None else out + b2, h, amax


_fp8_forward_impl = compiled_on_cuda(_fp8_forward)


@torch.library.custom_op("speedrun::fp8_relu2_mlp", mutates_args=())
def fp8_relu2_mlp_op(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, h_amax: Tensor,
                     headroom: float) -> tuple[Tensor, Tensor, Tensor]:
    """M2's forward on x (M, K), W1 (H, K), W2 (D, H) in one dtype -> (out (M, D) in x's dtype,
    h (M, H) for backward, h's amax (fp32, 0-d)). h_amax is the delayed amax (0: none yet)."""
    return _fp8_forward_impl(x, w1, b1, w2, b2, h_amax, headroom)


@fp8_relu2_mlp_op.register_fake
def _(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, h_amax: Tensor, headroom: float):
    return x.new_empty(x.size(0), w2.size(0)), x.new_empty(x.size(0), w1.size(0)), h_amax.new_empty(())


def _fp8_setup_context(ctx, inputs, output):
    x, w1, _, w2, *_ = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.set_materialize_grads(False)


def _fp8_backward(ctx, grad_out: Tensor, _grad_h, _grad_amax):
    grads = _relu2_mlp_grads(grad_out, *ctx.saved_tensors, ctx.needs_input_grad[2], ctx.needs_input_grad[4])
    return *grads, None, None


fp8_relu2_mlp_op.register_autograd(_fp8_backward, setup_context=_fp8_setup_context)


def fp8_relu2_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, h_amax: Tensor,
                  headroom: float) -> tuple[Tensor, Tensor]:
    """M2 on x (..., K) -> (out (..., D), h's amax this call, for the caller to store as the next
    call's h_amax). Weights and biases in x's dtype."""
    out, _, amax = torch.ops.speedrun.fp8_relu2_mlp(x.flatten(0, -2), w1, b1, w2, b2, h_amax, headroom)
    return out.view(*x.shape[:-1], out.size(-1)), amax


class MLP(nn.Module):
    """act(x W1ᵀ + b1) W2ᵀ + b2, W1 `fc` (hidden × model_dim), W2 `proj` (model_dim × hidden), hidden =
    mlp_ratio·model_dim. `fp8` is off until speedrun.prepare turns it on for training (the module
    doc says what M1 and M2 do; M2 keeps only h for backward, as M1, whatever mlp_recompute says).
    `h_amax` exists only where ModelConfig.fp8_mlp is not "off", so other configs' checkpoints hold
    the same tensors as before it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from speedrun.model import Linear  # here, not at the top: speedrun.model imports this module

        hidden = cfg.mlp_ratio * cfg.model_dim
        self.fc = Linear(cfg.model_dim, hidden, cfg.bias)
        self.proj = Linear(hidden, cfg.model_dim, cfg.bias)
        # NorMuon's tag: the record stores this matrix transposed, and NorMuon treats it so
        self.proj.weight.matrix_layout = ("mlp_out",)
        self.relu2 = cfg.activation == "relu2"
        if (cfg.mlp_recompute or cfg.fp8_mlp != "off") and not self.relu2:
            raise ValueError("model.mlp_recompute and model.fp8_mlp need model.activation = relu2")
        self.recompute = cfg.mlp_recompute
        self.fp8 = False
        # set by speedrun.prepare where a run compiles by regions (CPU): M1's backward compiled
        self.compiled = False
        self.fp8_headroom = cfg.fp8_mlp_headroom
        self.register_buffer("h_amax", torch.zeros(()) if cfg.fp8_mlp != "off" else None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.relu2:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        if self.fp8 and self.training:
            out, amax = fp8_relu2_mlp(x, *self._weights_like(x), self.h_amax, self.fp8_headroom)
            self.h_amax.copy_(amax.detach())
            return out
        if self.recompute:
            return ReluSquaredMLP.apply(x, *self._weights_like(x), self.compiled)
        return self.proj(F.relu(self.fc(x)).square())

    def _weights_like(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """W1, b1, W2, b2 cast to x's dtype, as Linear casts them."""
        fc, proj = self.fc, self.proj
        return (fc.weight.type_as(x), None if fc.bias is None else fc.bias.type_as(x),
                proj.weight.type_as(x), None if proj.bias is None else proj.bias.type_as(x))
