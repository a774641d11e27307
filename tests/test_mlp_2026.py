"""speedrun.mlp: the plain MLP against its formula, M1 (recompute from h) against autograd, and M2
(FP8 matmuls with a delayed scale for h) against float64 references.

FP8 tolerances (norm-wise relative errors, as in test_fp8): rounding to e4m3 leaves an rms error of
about 0.026 per element on Gaussian-like data, so a product of two e4m3 operands is off by about
sqrt(2)·0.026 = 0.037. The up-projection's error δu (nearly the same size on every element) doubles
through the square: ‖2u·δu‖ / ‖u²‖ over the positive half of a Gaussian u is
2·0.037·sqrt(E u² / E u⁴) = 2·0.037/sqrt(3) = 0.043 for h; the down-projection adds its own 0.037,
0.057 in all. Measured: 0.043, 0.037 and 0.057; the bounds are 1.5x the estimates. Each needs the
data spread as the model's: rms-normed x and the speedrun's uniform init."""

import copy

import pytest
import torch
import torch.nn.functional as F

from speedrun.config import ModelConfig
from speedrun.mlp import MLP, fp8_relu2_mlp_op

D, HIDDEN, TOKENS = 32, 128, 64  # model_dim 32 with mlp_ratio 4; 2 sequences of 32 tokens
H_BOUND, DOWN_BOUND, TOTAL_BOUND = 1.5 * 0.043, 1.5 * 0.037, 1.5 * 0.057


def config(**overrides) -> ModelConfig:
    return ModelConfig(model_dim=D, mlp_ratio=4, **{"activation": "relu2", **overrides})


def filled(mlp: MLP, seed: int = 0) -> MLP:
    """The speedrun's uniform init for both matrices (W2 not zeroed, so every path carries signal)
    and small random biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            if name.endswith("weight"):
                bound = 3 ** 0.5 * 0.5 * p.size(1) ** -0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return mlp


def inputs(seed: int = 1, dtype=torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, TOKENS // 2, D, generator=g) * scale).to(dtype)


def plain(mlp: MLP, x, activation: str = "relu2"):
    """The MLP as model.py computed it before speedrun.mlp: Linear casts its fp32 weights to x's dtype."""
    def linear(x, layer):
        return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    u = linear(x, mlp.fc)
    return linear(F.relu(u).square() if activation == "relu2" else F.gelu(u, approximate="tanh"), mlp.proj)


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def op_inputs(mlp: MLP, x):
    """fp8_relu2_mlp_op's tensor arguments for `mlp` on x: x flattened, W1, b1, W2, b2 in x's dtype."""
    cast = lambda t: None if t is None else t.detach().to(x.dtype)
    return x.flatten(0, 1), cast(mlp.fc.weight), cast(mlp.fc.bias), cast(mlp.proj.weight), cast(mlp.proj.bias)


# --- the plain MLP ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_mlp_is_the_old_mlp_bit_for_bit(activation, bias, dtype):
    mlp = filled(MLP(config(activation=activation, bias=bias)))
    names = {"fc.weight": (HIDDEN, D), "proj.weight": (D, HIDDEN)}
    if bias:
        names |= {"fc.bias": (HIDDEN,), "proj.bias": (D,)}
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == names  # no buffer either
    assert mlp.proj.weight.matrix_layout == ("mlp_out",) and not hasattr(mlp.fc.weight, "matrix_layout")
    x = inputs(dtype=dtype)
    assert torch.equal(mlp(x), plain(mlp, x, activation))
    mlp.eval()
    assert torch.equal(mlp(x), plain(mlp, x, activation))


@pytest.mark.parametrize("overrides", [{"mlp_recompute": True}, {"fp8_mlp": "on"}, {"fp8_mlp": "auto"}])
def test_recompute_and_fp8_need_relu2(overrides):
    with pytest.raises(ValueError, match="relu2"):
        MLP(config(activation="gelu", **overrides))


# --- M1: recompute from h -----------------------------------------------------------------------

def gradients(mlp: MLP, x, forward, grad_out):
    x = x.clone().requires_grad_()
    mlp.zero_grad()
    forward(x).backward(grad_out)
    return [x.grad] + [p.grad.clone() for p in mlp.parameters()]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_recompute_gradients_equal_autograd(bias, dtype, bound):
    """fp32: only the roundings of sqrt(relu(u)²) differ. bf16: h is stored rounded to 8 bits, so
    sqrt(h) is relu(u) to within 2^-9 relative, and each gradient picks up about that."""
    mlp = filled(MLP(config(bias=bias, mlp_recompute=True)))
    x = inputs(dtype=dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert torch.equal(mlp(x), plain(mlp, x))
    recomputed = gradients(mlp, x, mlp, grad_out)
    expected = gradients(mlp, x, lambda x: plain(mlp, x), grad_out)
    assert len(recomputed) == (5 if bias else 3)
    for actual, reference in zip(recomputed, expected):
        assert actual.dtype == reference.dtype and actual.shape == reference.shape
        assert relative_error(actual, reference.double()) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_with_its_backward_compiled_gives_the_eager_gradients(dtype):
    """MLP.compiled (set by speedrun.prepare for CPU training) compiles M1's elementwise backward into
    one pass: the same fp32 sqrt and products, rounded once to the activations' dtype as eagerly."""
    mlp = filled(MLP(config(mlp_recompute=True)))
    x = inputs(dtype=dtype)
    x[0, :4] = 0  # rows whose h is all zeros: sqrt(0) must give exactly 0 in both
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    eager = gradients(mlp, x, mlp, grad_out)
    mlp.compiled = True
    compiled = gradients(mlp, x, mlp, grad_out)
    for actual, expected in zip(compiled, eager):
        assert torch.equal(actual, expected)


def saved_shapes(forward, x) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x.clone().requires_grad_())
    return shapes


def test_recompute_keeps_only_h_of_the_hidden_activations():
    mlp = filled(MLP(config(mlp_recompute=True)))
    x = inputs()
    hidden_sized = lambda shapes: [s for s in shapes if s[-1] == HIDDEN and len(s) == 3]
    assert len(hidden_sized(saved_shapes(lambda x: plain(mlp, x), x))) >= 2  # u or relu(u), and h
    assert hidden_sized(saved_shapes(mlp, x)) == [(2, TOKENS // 2, HIDDEN)]  # h alone


def test_recompute_compiles_with_the_same_gradients():
    """Inductor on CPU (seconds): dynamo traces the Function whole; fused kernels round differently."""
    mlp = filled(MLP(config(bias=True, mlp_recompute=True)))
    x = inputs()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(mlp, fullgraph=True)
    for actual, expected in zip(gradients(mlp, x, compiled, grad_out), gradients(mlp, x, mlp, grad_out)):
        assert relative_error(actual, expected.double()) < 1e-6


# --- M2: FP8 ------------------------------------------------------------------------------------

def fp8_mlp(headroom: float = 1.8, **overrides) -> MLP:
    mlp = filled(MLP(config(fp8_mlp="on", fp8_mlp_headroom=headroom, **overrides)))
    mlp.fp8 = True  # as speedrun.prepare sets it for training
    return mlp


def float64_mlp(mlp: MLP, x, h=None):
    """(h, out) in float64 from x and the weights as the op sees them; `h` replaces the computed one."""
    x64, w1, b1, w2, b2 = [None if t is None else t.double() for t in op_inputs(mlp, x)]
    if h is None:
        h = F.relu(F.linear(x64, w1, b1)).square()
    return h, F.linear(h, w2, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_forward_is_close_to_the_float_mlp(dtype):
    mlp = fp8_mlp(bias=True)
    x = inputs(dtype=dtype)
    out, h, amax = fp8_relu2_mlp_op(*op_inputs(mlp, x), torch.zeros(()), 1.8)
    assert out.dtype == h.dtype == dtype and out.shape == (TOKENS, D) and h.shape == (TOKENS, HIDDEN)
    h64, out64 = float64_mlp(mlp, x)
    assert relative_error(h, h64) < H_BOUND
    assert relative_error(out, float64_mlp(mlp, x, h.double())[1]) < DOWN_BOUND  # the down-projection alone
    assert 0.02 < relative_error(out, out64) < TOTAL_BOUND  # and FP8 it is: bf16 alone would be ~0.004
    assert amax.dtype == torch.float32 and amax.item() == h.max().item()
    torch.testing.assert_close(mlp(x).flatten(0, 1), out, rtol=0, atol=0)  # the module runs this op


def test_fp8_saturates_h_above_the_delayed_amax_times_headroom():
    """A delayed amax far below this call's: h is clipped at h_amax × headroom, not wrapped or NaN."""
    mlp, x = fp8_mlp(bias=True), inputs()
    _, h, amax = fp8_relu2_mlp_op(*op_inputs(mlp, x), torch.zeros(()), 1.8)
    delayed, headroom = 0.1 * amax.item(), 1.5
    out, h_again, _ = fp8_relu2_mlp_op(*op_inputs(mlp, x), torch.tensor(delayed), headroom)
    assert torch.equal(h_again, h) and out.isfinite().all()
    clipped = h.double().clamp(max=delayed * headroom)
    assert (h.double() > delayed * headroom).float().mean() > 0.01  # enough clipped values to see
    assert relative_error(out, float64_mlp(mlp, x, clipped)[1]) < DOWN_BOUND
    assert relative_error(out, float64_mlp(mlp, x, h.double())[1]) > 3 * DOWN_BOUND


def test_fp8_delayed_amax_follows_the_previous_call():
    """Call 1 (h_amax = 0) scales h by its own amax; each call stores its amax in h_amax; call 2 scales
    by call 1's, exactly as the op given that amax does."""
    mlp, headroom = fp8_mlp(headroom=1.25), 1.25
    x1, x2 = inputs(seed=1), inputs(seed=2, scale=1.5)  # call 2's h is larger: an amax of its own would differ
    unset = torch.zeros(())
    _, h1, amax1 = fp8_relu2_mlp_op(*op_inputs(mlp, x1), unset, headroom)
    out2_own, h2, amax2 = fp8_relu2_mlp_op(*op_inputs(mlp, x2), unset, headroom)
    assert amax1.item() == h1.max().item() and amax2.item() == h2.max().item() > 1.5 * amax1.item()
    out1_bootstrap = fp8_relu2_mlp_op(*op_inputs(mlp, x1), unset, headroom)[0]
    assert torch.equal(out1_bootstrap, fp8_relu2_mlp_op(*op_inputs(mlp, x1), amax1, headroom)[0])

    assert mlp.h_amax.item() == 0
    assert torch.equal(mlp(x1).flatten(0, 1), out1_bootstrap)
    assert mlp.h_amax.item() == amax1.item()
    out2 = mlp(x2).flatten(0, 1)
    assert torch.equal(out2, fp8_relu2_mlp_op(*op_inputs(mlp, x2), amax1, headroom)[0])
    assert not torch.equal(out2, out2_own)
    assert mlp.h_amax.item() == amax2.item()


def test_fp8_backward_is_straight_through():
    """fp32 activations (CPU): the gradients are the plain MLP's at the unquantised x, W1, W2 and this
    forward's h, written out in float64; only fp32 rounding differs."""
    mlp, x = fp8_mlp(bias=True), inputs()
    x_flat, w1, b1, w2, b2 = [t.detach().clone().requires_grad_() for t in op_inputs(mlp, x)]
    out, h, _ = fp8_relu2_mlp_op(x_flat, w1, b1, w2, b2, torch.zeros(()), 1.8)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(g)
    g64, x64, w1_64, w2_64, h64 = g.double(), x_flat.detach().double(), w1.detach().double(), w2.detach().double(), h.detach().double()
    du = (g64 @ w2_64) * 2 * h64.sqrt()
    expected = [du @ w1_64, du.T @ x64, du.sum(0), g64.T @ h64, g64.sum(0)]
    for actual, reference in zip([x_flat.grad, w1.grad, b1.grad, w2.grad, b2.grad], expected):
        assert relative_error(actual, reference) < 1e-6


def test_fp8_gradients_in_bf16_are_the_plain_ones_within_fp8_error():
    """On the module, in bf16: the parameters' gradients are those of the plain bf16 MLP, off only by h
    coming from the FP8 up-projection (H_BOUND), never by quantised gradients."""
    mlp, x = fp8_mlp(bias=True), inputs(dtype=torch.bfloat16)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    fp8 = gradients(mlp, x, mlp, grad_out)
    expected = gradients(mlp, x, lambda x: plain(mlp, x), grad_out)
    for actual, reference in zip(fp8, expected):
        assert actual.dtype == reference.dtype and relative_error(actual, reference.double()) < H_BOUND


def test_fp8_delayed_amax_is_checkpointed_and_resume_is_exact():
    assert "h_amax" in fp8_mlp().state_dict() and "h_amax" in MLP(config(fp8_mlp="auto")).state_dict()
    assert "h_amax" not in MLP(config()).state_dict()
    run = fp8_mlp()
    run(inputs(seed=1))
    resumed = MLP(config(fp8_mlp="on"))
    resumed.load_state_dict(copy.deepcopy(run.state_dict()))  # a checkpoint taken after step 1
    resumed.fp8 = True
    assert resumed.h_amax.item() == run.h_amax.item() > 0
    x2 = inputs(seed=2)
    assert torch.equal(resumed(x2), run(x2))


def test_fp8_only_in_training_mode():
    mlp, x = fp8_mlp(bias=True), inputs()
    mlp.eval()
    assert torch.equal(mlp(x), plain(mlp, x)) and mlp.h_amax.item() == 0
    mlp.train()
    assert not torch.equal(mlp(x), plain(mlp, x)) and mlp.h_amax.item() > 0
    mlp.fp8 = False  # fp8_mlp = "auto" on a device without FP8: the plain path, buffer left alone
    amax = mlp.h_amax.clone()
    assert torch.equal(mlp(x), plain(mlp, x)) and torch.equal(mlp.h_amax, amax)


def test_fp8_op_registration_and_compile():
    """Fake kernel and autograd formula agree with the real op; a compiled training step runs it
    as one opaque call and updates the buffer as eager does."""
    mlp, x = fp8_mlp(bias=True), inputs()
    args = [t.detach().clone().requires_grad_() for t in op_inputs(mlp, x)]
    for check in ["test_faketensor", "test_autograd_registration"]:
        torch.library.opcheck(torch.ops.speedrun.fp8_relu2_mlp.default, (*args, torch.zeros(()), 1.8),
                              test_utils=check)
    eager = copy.deepcopy(mlp)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for step_x in (inputs(seed=1), inputs(seed=2)):
        for actual, expected in zip(gradients(mlp, step_x, compiled, grad_out),
                                    gradients(eager, step_x, eager, grad_out)):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        assert mlp.h_amax.item() == eager.h_amax.item() > 0


@pytest.mark.gpu
def test_fp8_mlp_on_cuda_matches_float64():
    """The CUDA path (_scaled_mm on tensor cores, compute capability >= 8.9; dimensions multiples of
    16), in bf16 as training runs it, eager and compiled with inductor."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9")
    mlp = fp8_mlp(bias=False).cuda()
    x = inputs(dtype=torch.bfloat16).cuda()
    out, h, _ = fp8_relu2_mlp_op(*op_inputs(mlp, x), torch.zeros((), device="cuda"), 1.8)
    h64, out64 = float64_mlp(mlp, x)
    assert relative_error(h, h64) < H_BOUND and relative_error(out, out64) < TOTAL_BOUND
    eager = copy.deepcopy(mlp)
    compiled = torch.compile(mlp, dynamic=False)
    grad_out = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    for actual, expected in zip(gradients(mlp, x, compiled, grad_out), gradients(eager, x, eager, grad_out)):
        assert relative_error(actual, expected.double()) < 1e-2
    assert mlp.h_amax.item() == eager.h_amax.item() > 0
