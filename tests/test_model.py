"""The GPT: parameter counts worked out by hand, every ModelConfig switch doing what it says, and
the tiny preset memorising one batch."""

import math
import subprocess
import sys
import warnings

import pytest
import torch

import speedrun.attention
import speedrun.prepare
from speedrun.attention import NO_WINDOW
from speedrun.config import load_config, preset_names
from speedrun.data.tokenizer import EOT
from speedrun.model import GPT, Attention
from speedrun.rotary import rotary_tables
from conftest import prepared
from torch.utils._python_dispatch import TorchDispatchMode

def tiny(**changes):
    """The tiny preset with random (not zero) output projections and head, so that every part of
    the network reaches the logits, plus any field changes."""
    cfg = load_config("tiny-2025").model
    cfg.zero_init_proj = cfg.zero_init_head = False
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def batch(B=2, T=128, seed=0, bos=()):
    idx = torch.randint(0, EOT, (B, T), generator=torch.Generator().manual_seed(seed))
    for t in bos:
        idx[:, t] = EOT
    return idx


def logits(model, idx, window=NO_WINDOW):
    with torch.no_grad():
        return model(idx, None, window_tokens=window)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_gpt2_speedrun_parameter_count():
    with torch.device("meta"):
        model = GPT(load_config("gpt2-speedrun-2025").model)
    vocab, padded, d, layers = 50257, 50304, 768, 12
    table = vocab * d  # lookup tables have the vocabulary's rows; the head is padded to a multiple of 128
    attention = 3 * d * d + d * d  # fused qkv + output projection
    mlp = 2 * d * 4 * d
    scalars = (2 * layers  # x0 mixing, per block
               + 2 * 6 + 1 * 5  # value mixing: (a, b) in the 6 value-embedding layers, a in the 5 other attention layers
               + layers // 2)  # U-net skip weights
    expected = table + 3 * table + 11 * attention + 12 * mlp + padded * d + scalars
    print(f"gpt2-speedrun-2025 parameters: {n_params(model):,} (expected {expected:,})")
    assert n_params(model) == expected == 275_598_383
    assert all(p.device.type == "meta" for p in model.parameters())


def test_gpt2_baseline_parameter_count():
    with torch.device("meta"):
        model = GPT(load_config("gpt2-baseline").model)
    vocab, d, layers = 50304, 768, 12
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    expected = vocab * d + 1024 * d + layers * block + 2 * d  # tied head; final LayerNorm
    assert n_params(model) == expected  # nanoGPT's 124M model, with its padded vocabulary
    print(f"gpt2-baseline parameters: {n_params(model):,}")


@pytest.mark.parametrize("preset", ["gpt2-speedrun-2025", "gpt2-baseline", "tiny-2025", "baseline-tiny"])
def test_param_groups_partition_the_parameters(preset):
    with torch.device("meta"):
        model = GPT(load_config(preset).model)
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in groups["hidden"]) and all(p.ndim < 2 for p in groups["scalar"])
    assert ("head" in groups) == (not model.cfg.tied_head)
    in_blocks = {id(p) for p in model.blocks.parameters()}
    assert all(id(p) in in_blocks for p in groups["hidden"])
    assert {id(p) for p in groups["embed"]} == {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def test_flops_per_token():
    cfg = load_config("gpt2-baseline").model
    with torch.device("meta"):
        model = GPT(cfg)
    d, T = 768, 1024
    matmul = 12 * 12 * d * d + 50304 * d  # block matrices (no biases) + the tied head
    attention = 12 * 12 * d * (T + 1) / 2  # causal: a query sees (t + 1) keys, on average (T + 1) / 2
    assert model.flops_per_token(T) == pytest.approx(6 * matmul + attention)
    cfg = load_config("gpt2-speedrun-2025").model
    with torch.device("meta"):
        model = GPT(cfg)
    # seq_len far beyond the windows: each query sees ~window keys (1792 in L layers, 896 in S)
    long_layers = sum(c == "L" for i, c in enumerate(cfg.long_short_pattern) if i not in cfg.skip_attn_layers)
    short_layers = 11 - long_layers
    approx = 6 * (11 * 4 * d * d + 12 * 8 * d * d + 50304 * d) + 12 * d * (1792 * long_layers + 896 * short_layers)
    assert model.flops_per_token(49152) == pytest.approx(approx, rel=0.01)


def test_initial_loss_is_uniform_with_zero_init():
    model = build(load_config("tiny-2025").model)
    idx = batch()
    out = logits(model, idx, 256)
    assert out.shape == (2, 128, 50257) and out.dtype == torch.float32
    assert torch.all(out == 15.0)  # zero head -> cap * sigmoid(0)
    loss = model(idx, idx.long(), window_tokens=256)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(math.log(50257), abs=1e-4)  # padding columns take no mass
    assert all(not b.mlp.proj.weight.any() and not b.attn.proj.weight.any() for b in model.blocks)


def test_int32_inputs():
    model = build(tiny())
    idx = batch()
    torch.testing.assert_close(logits(model, idx.int(), 256), logits(model, idx, 256))


def test_tied_head_shares_storage():
    model = build(tiny(tied_head=True, zero_init_head=False))
    assert model.lm_head.weight is None and model.head_weight is model.wte.weight
    assert n_params(model) == n_params(build(tiny())) - 50257 * 128  # one table fewer, with the head's padded rows


def test_skip_attn_layers():
    model = build(tiny(skip_attn_layers=[2, 4]))
    assert [b.attn is None for b in model.blocks] == [False, False, True, False, True, False]
    assert [b.attn_norm is None for b in model.blocks] == [False, False, True, False, True, False]
    assert sum(isinstance(m, Attention) for m in model.modules()) == 4
    assert logits(model, batch(), 256).isfinite().all()


def test_value_embeds():
    model = build(tiny(value_embeds=2))
    assert len(model.value_embeds) == 2
    # layers 0, 1 use tables 0, 1; the last two layers 4, 5 reuse them; 2, 3 use none
    assert [model._value_table(i) for i in range(6)] == [0, 1, None, None, 0, 1]
    assert [b.attn.v_mix.numel() for b in model.blocks] == [2, 2, 1, 1, 2, 2]
    without = build(tiny(value_embeds=0))
    assert len(without.value_embeds) == 0 and all(b.attn.v_mix is None for b in without.blocks)
    assert n_params(model) - n_params(without) == 2 * 50257 * 128 + 4 * 2 + 2 * 1


def test_value_embeddings_reach_the_output():
    model = build(tiny())
    idx = batch()
    before = logits(model, idx, 256)
    with torch.no_grad():
        model.value_embeds[1].weight.mul_(2)
    assert not torch.allclose(before, logits(model, idx, 256))


def test_learned_positions():
    model = build(tiny(positional="learned", max_seq_len=512))
    assert model.wpe.weight.shape == (512, 128)
    assert build(tiny()).wpe is None
    idx = batch()
    before = logits(model, idx)
    with torch.no_grad():
        model.wpe.weight[100].add_(1.0)
    after = logits(model, idx)
    assert torch.equal(before[:, :100], after[:, :100]) and not torch.allclose(before[:, 100:], after[:, 100:])


def test_unet_skips():
    model = build(tiny())
    assert model.skip_weights.tolist() == [1.0, 1.0, 1.0]
    assert build(tiny(unet_skips=False)).skip_weights is None
    idx = batch()
    before = logits(model, idx, 256)
    with torch.no_grad():
        model.skip_weights.zero_()
    assert not torch.allclose(before, logits(model, idx, 256))
    odd = build(tiny(n_layer=5, long_short_pattern="LSSSL"))  # layers 0, 1 feed 4, 3; layer 2 gets no skip
    assert odd.skip_weights.numel() == 2 and logits(odd, idx, 256).isfinite().all()


def test_x0_mix():
    model = build(tiny())
    assert all(b.x0_mix.tolist() == [1.0, 0.0] for b in model.blocks)
    assert all(b.x0_mix is None for b in build(tiny(x0_mix=False)).blocks)


def test_logit_softcap_bounds_logits():
    model = build(tiny())
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # raw logits with std ~15, far past the cap
    out = logits(model, batch(), 256)
    assert out.min() > 0 and out.max() < 30 and out.max() > 29
    model = build(tiny(logit_softcap=0.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    out = logits(model, batch(), 256)
    assert out.min() < 0 and out.max() > 30


def test_document_mask_changes_outputs_only_after_a_bos():
    with_docs, without = build(tiny()), build(tiny(document_mask=False))
    assert torch.equal(logits(with_docs, batch(), 256), logits(without, batch(), 256))
    idx = batch(bos=[0, 100])  # a BOS at 0 splits nothing off; the one at 100 starts a document
    a, b = logits(with_docs, idx, 256), logits(without, idx, 256)
    assert torch.allclose(a[:, :100], b[:, :100], atol=1e-5)
    assert not torch.allclose(a[:, 100:], b[:, 100:], atol=1e-3)


def test_window_changes_outputs_only_beyond_the_window():
    model = build(tiny())  # pattern LSSSSL: S layers see window // 2
    idx = batch(T=256)
    full = logits(model, idx)
    assert torch.allclose(logits(model, idx, 512), full, atol=1e-5)  # even S layers see all 256 tokens
    narrow = logits(model, idx, 128)  # S layers see 64 tokens
    assert torch.allclose(narrow[:, :64], full[:, :64], atol=1e-5)
    assert not torch.allclose(narrow[:, 64:], full[:, 64:], atol=1e-3)


def test_long_short_pattern():
    idx = batch(T=256)
    all_long = build(tiny(long_short_pattern="LLLLLL"))
    mixed = build(tiny())
    assert torch.allclose(logits(all_long, idx, 256), logits(mixed, idx, 512), atol=1e-5)
    assert not torch.allclose(logits(all_long, idx, 256), logits(mixed, idx, 256), atol=1e-3)


def test_activation_norm_bias_and_scale_switches():
    idx = batch()
    base = logits(build(tiny()), idx, 256)
    assert not torch.allclose(base, logits(build(tiny(activation="gelu")), idx, 256))
    assert not torch.allclose(base, logits(build(tiny(qk_norm=False)), idx, 256))
    assert build(tiny(attn_scale=0.0)).blocks[0].attn.scale == 64 ** -0.5
    ln = build(tiny(norm="layernorm", bias=True))
    assert isinstance(ln.final_norm, torch.nn.LayerNorm) and ln.final_norm.bias is not None
    assert ln.blocks[0].mlp.fc.bias is not None and ln.blocks[0].attn.qkv_bias.shape == (3 * 128,)
    assert build(tiny()).blocks[0].mlp.fc.bias is None
    assert not list(build(tiny()).final_norm.parameters())  # rms norm is parameter-free


def test_rotary_half_truncation():
    cfg = tiny()
    cos, sin = rotary_tables(300, cfg, "cpu")
    assert cos.shape == (300, 32)
    assert torch.all(cos[:, 16:] == 1) and torch.all(sin[:, 16:] == 0)  # second half of the pairs stays still
    assert torch.allclose(cos[1, :16], torch.cos((1 / 1024) ** torch.linspace(0, 1, 16)))
    cfg.rotary_half_truncate = False
    cos, sin = rotary_tables(300, cfg, "cpu")
    assert not torch.any(sin[1] == 0)


def test_init_schemes():
    speedrun = build(tiny())
    w = speedrun.blocks[0].mlp.fc.weight
    assert w.std().item() == pytest.approx(0.5 * 128 ** -0.5, rel=0.05) and w.abs().max() <= 3 ** 0.5 * 0.5 * 128 ** -0.5
    assert speedrun.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    baseline = build(load_config("baseline-tiny").model)
    assert baseline.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert baseline.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 12 ** 0.5, rel=0.05)
    assert baseline.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_meta_build_then_materialise():
    cfg = load_config("tiny-2025").model
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    loss = model(batch(), batch().long(), window_tokens=256)
    assert loss.item() == pytest.approx(math.log(50257), abs=1e-4)


def test_meta_builds_leave_the_compiler_unimported():
    """`speedrun sample`, `eval` and `export` build the model on the meta device, then load its
    weights. Drawing values there (normal_), or dividing or raising to a power, imports torch._dynamo:
    1.3-1.7 s of their start-up. No preset's build does (in a fresh process: this one has compiled)."""
    code = ("import sys, torch\n"
            "from speedrun.config import load_config, preset_names\n"
            "from speedrun.model import GPT\n"
            "for name in preset_names():\n"
            "    with torch.device('meta'):\n"
            "        GPT(load_config(name).model)\n"
            "print(len(preset_names()), sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split(maxsplit=1) == [str(len(preset_names())), "[]\n"]


# The attention kernels' operands, by their schema names: their backward also reads float32
# softmax statistics (logsumexp, which cuDNN keeps as a (B, H, T, 1) tensor), and a mask may be a bias.
ATTENTION_OPERANDS = {"query", "key", "value", "out", "grad_out"}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the floating-point inputs of every matmul and attention kernel (for
    attention its ATTENTION_OPERANDS)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        attention = "scaled_dot_product" in name
        if name.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm") or attention:
            inputs = [a for a, spec in zip(args, func._schema.arguments)
                      if not attention or spec.name in ATTENTION_OPERANDS]
            dtypes = {a.dtype for a in inputs if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(name.split(".")[0], set()).update(dtypes)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("positional,norm", [("rotary", "rms"), ("learned", "layernorm")])
def test_bf16_mode_runs_every_matmul_and_attention_in_bf16(positional, norm):
    """activation_dtype = bfloat16 without autocast, as the record runs: embedding tables stored in
    bf16, and every matmul and attention call, forward and backward, gets bf16 inputs (a float32
    one would mean a float32 residual stream, q or k somewhere)."""
    cfg = tiny(activation_dtype="bfloat16", positional=positional, norm=norm, max_seq_len=128)
    model = prepared(build(cfg))
    assert model.wte.weight.dtype == torch.bfloat16 and model.blocks[0].attn.qkv.dtype == torch.float32
    with MatmulDtypes() as seen:
        loss = model(batch(T=128), batch(T=128, seed=1), window_tokens=128)
        loss.backward()
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert "mm" in seen.seen
    assert any("scaled_dot_product" in name for name in seen.seen)
    assert all(dtypes == {torch.bfloat16} for dtypes in seen.seen.values()), seen.seen
    assert model.wte.weight.grad.dtype == torch.bfloat16 and model.blocks[0].attn.qkv.grad.dtype == torch.float32


def test_float32_mode_keeps_float32():
    model = prepared(build(tiny(activation_dtype="float32")), mode="eval")
    assert model.activation_dtype == torch.float32 and model.wte.weight.dtype == torch.float32
    with MatmulDtypes() as seen:
        model(batch(T=128), batch(T=128, seed=1), window_tokens=128)
    assert all(dtypes == {torch.float32} for dtypes in seen.seen.values()), seen.seen


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_auto_activations_on_cpu_are_bf16_only_where_the_cpu_has_fast_bf16(monkeypatch, fast_bf16):
    monkeypatch.setattr(speedrun.prepare, "cpu_has_fast_bf16", lambda: fast_bf16)
    model = prepared(build(tiny(activation_dtype="auto")))
    assert model.activation_dtype == (torch.bfloat16 if fast_bf16 else torch.float32)


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, False), (True, False, True), (False, True, True),
                                                      (None, None, False)])
def test_fast_bf16_means_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    for name, answer in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if answer is None:  # a torch without the probe
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda answer=answer: answer, raising=False)
    assert speedrun.prepare.cpu_has_fast_bf16() is expected


def test_fp8_switch():
    assert prepared(GPT(tiny(fp8_head="off"))).lm_head.fp8_scales is None
    assert prepared(GPT(tiny(fp8_head="on"))).lm_head.fp8_scales == tiny().fp8_scales
    assert prepared(GPT(tiny(fp8_head="auto"))).lm_head.fp8_scales is None  # no FP8 tensor cores on a CPU
    assert prepared(GPT(tiny(fp8_head="on")), mode="eval").lm_head.fp8_scales is None  # evaluation in bf16


def test_lookup_tables_have_the_vocabulary_rows():
    """As the record: 50,257 rows in every lookup table, the head padded to 50,304; a tied table
    is the head too, so it keeps the padding."""
    model = GPT(tiny())
    assert model.wte.num_embeddings == 50257 and model.value_embeds[0].num_embeddings == 50257
    assert model.lm_head.weight.shape[0] == 50304
    assert GPT(tiny(tied_head=True, zero_init_head=False)).wte.num_embeddings == 50304


def test_flex_and_sdpa_models_agree(monkeypatch):
    """The model's FlexAttention plumbing (masks per L/S layer, shared per forward) matches SDPA.
    On CPU flex only runs without gradients, so it is forced on here under no_grad."""
    flex, sdpa = build(tiny(attention="flex")), build(tiny(attention="sdpa"))
    idx = batch(T=256, bos=[30, 200])
    expected = logits(sdpa, idx, 128)
    monkeypatch.setattr(speedrun.attention, "use_flex", lambda cfg, seq_len, device: cfg.attention == "flex")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch.testing.assert_close(logits(flex, idx, 128), expected, atol=1e-4, rtol=1e-4)


def test_baseline_uses_plain_causal_attention():
    cfg = load_config("baseline-tiny").model
    assert speedrun.attention.build_masks(batch(), NO_WINDOW, cfg) == {"L": None, "S": None}
    model = build(cfg)
    assert model.wpe is not None and model.lm_head.weight is None
    assert logits(model, batch(bos=[50])).isfinite().all()


def test_tiny_preset_memorises_one_batch():
    """Plain Adam on one fixed (4, 128) batch of random tokens: the loss starts at ln(50257) and
    falls below 1.0 by step ~9 and to ~0.15 by step 15 (lr 0.01; 0.02 oscillates). Fewer steps than
    a typical overfit check because each step costs ~0.5 s on 2 cores, almost all of it the
    (512 x 128) @ (128 x 50304) head matmul and its backward."""
    torch.manual_seed(0)
    model = GPT(load_config("tiny-2025").model)
    idx = torch.randint(0, EOT, (4, 129), generator=torch.Generator().manual_seed(0))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    losses = []
    for _ in range(15):
        loss = model(inputs, targets, window_tokens=128)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print("losses:", [round(x, 3) for x in losses])
    assert losses[0] == pytest.approx(math.log(50257), abs=1e-3)
    assert losses[-1] < 1.0


@pytest.mark.slow
def test_compiled_flex_model_on_cpu(monkeypatch):
    """The whole forward with FlexAttention compiles as one graph (masks built inside it), matches
    eager SDPA, and does not recompile when the window tensor changes. CPU Inductor compiles flex
    forward-only, so this runs under no_grad; gradients through compiled flex need CUDA."""
    cfg = tiny(n_layer=2, long_short_pattern="LS", value_embeds=1)
    model = build(cfg)
    sdpa = build(tiny(n_layer=2, long_short_pattern="LS", value_embeds=1, attention="sdpa"))
    idx = batch(T=256, bos=[30, 200])
    monkeypatch.setattr(speedrun.attention, "use_flex", lambda cfg, seq_len, device: cfg.attention == "flex")
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    for window in [128, 200]:
        w = torch.tensor(window, dtype=torch.int32)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=window != 128):
            torch.testing.assert_close(compiled(idx, None, window_tokens=w), logits(sdpa, idx, w), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_bf16_training_step_on_cuda():
    """One eager step of the tiny model as the trainer runs it: bf16 activations, bf16 embeddings,
    FlexAttention, and the FP8 head where the GPU has it; FlexAttention matches SDPA."""
    torch.manual_seed(0)
    model = prepared(GPT(tiny()), "cuda")
    idx = batch(B=4, T=256, bos=[17, 140]).cuda()
    window = torch.tensor(128, dtype=torch.int32, device="cuda")
    loss = model(idx.int(), idx.roll(-1, 1), window_tokens=window)
    loss.backward()
    assert loss.isfinite() and all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    sdpa = prepared(GPT(tiny(attention="sdpa")), "cuda", "eval")
    sdpa.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(idx, None, window_tokens=window), sdpa(idx, None, window_tokens=window)
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
