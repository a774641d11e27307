"""The FP8 head matmul against a float64 matmul.

Tolerance: rounding to m mantissa bits (round-to-nearest) leaves a relative error of at most
2^-(m+1) per element, and on Gaussian data an rms of about 0.21 * 2^-m: 0.026 for e4m3 (m = 3),
0.053 for e5m2 (m = 2), both measured. With random data the per-term errors are independent, so a
product's norm-wise relative error is about the root-sum-square of its two operands' errors:
0.037 for the forward (e4m3 x e4m3), 0.059 for both gradients (e5m2 x e4m3). The bounds below
allow 1.5x that; the bf16 output (rms error ~2^-10) is negligible next to it."""

import pytest
import torch

from speedrun.config import load_config
from speedrun.fp8 import fp8_linear
from speedrun.model import GPT

SCALES = [2.0, 512.0, 2.0 ** 19]  # the presets' fp8_scales
FORWARD_BOUND, GRAD_BOUND = 1.5 * 0.037, 1.5 * 0.059


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def check_against_float(device):
    g = torch.Generator().manual_seed(0)
    # magnitudes as in the model: rms-normed activations, the speedrun's uniform init for a
    # 128-wide head, and mean-CE gradients of order 1 / tokens
    x = torch.randn(256, 128, generator=g)
    w = (torch.rand(512, 128, generator=g) * 2 - 1) * 3 ** 0.5 * 0.5 * 128 ** -0.5
    grad = (torch.randn(256, 512, generator=g) * 1e-4).bfloat16()
    x, w, grad = x.to(device).requires_grad_(), w.to(device).requires_grad_(), grad.to(device)
    out = fp8_linear(x, w, SCALES)
    out.backward(grad)
    x64, w64, g64 = x.detach().double(), w.detach().double(), grad.double()
    assert out.dtype == torch.bfloat16 and out.shape == (256, 512)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # autograd casts grad_x to x's dtype
    errors = (relative_error(out, x64 @ w64.T), relative_error(x.grad, g64 @ w64), relative_error(w.grad, g64.T @ x64))
    print("relative errors (out, grad_x, grad_w):", [round(e, 4) for e in errors])
    assert errors[0] < FORWARD_BOUND and errors[1] < GRAD_BOUND and errors[2] < GRAD_BOUND


def test_fp8_matches_float_matmul_on_cpu():
    check_against_float("cpu")


def test_fp8_op_registration():
    """Fake (meta) kernels and autograd formula agree with the real op, and the op compiles whole."""
    x, w = torch.randn(64, 128, requires_grad=True), (torch.randn(256, 128) * 0.02).requires_grad_()
    # test_schema and test_aot_dispatch_dynamic would compare the FP8 outputs with ops CPU lacks for FP8
    for check in ["test_faketensor", "test_autograd_registration"]:
        torch.library.opcheck(torch.ops.speedrun.fp8_mm.default, (x, w, *SCALES), test_utils=check)
    compiled = torch.compile(lambda x, w: fp8_linear(x, w, SCALES).float().square().mean(), backend="aot_eager",
                             fullgraph=True)
    compiled(x, w).backward()
    assert x.grad.isfinite().all() and w.grad.abs().sum() > 0


def test_model_uses_fp8_only_in_training():
    cfg = load_config("tiny").model
    cfg.fp8_head, cfg.zero_init_head = "on", False
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, 1)
    model.eval()
    with torch.no_grad():
        exact = model(idx, targets, window_tokens=128)
    model.train()
    loss = model(idx, targets, window_tokens=128)
    assert loss.item() != exact.item() and loss.item() == pytest.approx(exact.item(), rel=0.01)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.wte.weight.grad.isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")
def test_fp8_matches_float_matmul_on_cuda():
    check_against_float("cuda")
