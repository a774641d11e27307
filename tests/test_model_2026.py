"""The 2026 record's model assembled (speedrun.model with the switches of record-2026.md §1 and §3):
parameter counts, start values that reproduce the simpler model, and the trainer's stage-driven
pieces (tied-then-untied head, YaRN)."""

import copy
import math

import pytest
import torch

from conftest import TINY_4_BLOCKS, Compiles, prepared
from speedrun.config import load_config
from speedrun.model import GPT
from speedrun.stages import untie_step, yarn_windows

SMALL = ["model.n_layer=6", "model.n_head=2", "model.head_dim=32", "model.model_dim=64", "model.vocab_size=512",
         "model.value_embed_layers=[1, 4, 5]", "model.skip_attn_layers=[]", "model.long_short_pattern=SSSLSL",
         "model.skip_connections=[[1, 3]]", "model.attn_input_layer=3", "model.gate_split_layer=2",
         "model.bigram_vocab=257", "model.bigram_sign_rows=64", "model.paired_head_layers=[0, 2]",
         "model.xsa_layers=[1, 3]", "model.attn_gate_layers=[2, 5]", "model.composable_layers=[5]",
         "model.composable_window=8"]


def small(overrides=()):
    return load_config("gpt2-speedrun", overrides=[*SMALL, *overrides]).model


def tokens(seed=0, B=2, T=64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 512, (B, T), generator=g)
    idx[:, 0] = 0
    return idx


def test_the_record_model_has_the_record_parameter_counts():
    """≈ 636M parameters in all, ≈ 75.5M outside the embedding tables (record-2026.md §1)."""
    with torch.device("meta"):
        model = GPT(load_config("gpt2-speedrun").model)
    total = sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for role in ("embed", "head", "value_embed") for p in model.param_groups()[role])
    assert 635.0e6 < total < 636.5e6
    assert abs((total - tables) - 75.5e6) < 0.25e6  # the gate and MUDD generators add 0.2M
    assert len(model.blocks) == 11 and model.blocks[6].attn is None
    assert sorted(int(k) for k in model.layer_value_embeds.tables) == [1, 2, 8, 9, 10]
    assert model.bigram.table.weight.shape == (377280, 768) and model.bigram.signs.shape == (8192, 768)


def test_every_parameter_is_used_and_has_one_role():
    torch.manual_seed(0)
    model = GPT(small())
    idx = tokens()
    model(idx, idx, window_tokens=32, short_window=16, future_weights=torch.tensor([1.0, 0.5])).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    roles = model.param_groups()
    assert sum(len(v) for v in roles.values()) == len(list(model.parameters()))
    assert {"value_embed", "gate", "smear", "resid", "branch", "mudd", "mudd_bias", "gate_gen", "gate_gen_bias"} <= set(roles)


def _transplant(source: GPT, target: GPT) -> None:
    """Copy every parameter the two models share by name and shape (gate generators of different
    layouts keep their own start values: their W2 is zero and their biases are the starts)."""
    mine = target.state_dict()
    shared = {k: v for k, v in source.state_dict().items() if k in mine and mine[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)


@pytest.mark.parametrize("switch, off", [
    ("gate_generators", ["model.gate_generators=false"]),  # generators at start = the constant gates
    ("xsa", ["model.xsa_layers=[]"]),  # tanh(0) = 0: no share of the own value removed
    ("smear", ["model.smear_gate=false"]),  # λ = 0
    ("composable", ["model.composable_layers=[]"]),  # w2 = 0
])
def test_a_switch_at_its_start_values_is_the_model_without_it(switch, off):
    torch.manual_seed(0)
    full = GPT(small())
    simpler = GPT(small(off))
    _transplant(full, simpler)
    idx = tokens()
    kw = dict(window_tokens=32, short_window=16)
    torch.testing.assert_close(full(idx, **kw), simpler(idx, **kw), rtol=1e-5, atol=1e-5)


def test_the_bigram_term_starts_at_zero_and_then_enters_with_its_gates():
    torch.manual_seed(0)
    model = GPT(small())
    idx = tokens()
    before = model(idx, window_tokens=32, short_window=16)
    with torch.no_grad():
        model.bigram.table.weight.normal_()
    assert not torch.allclose(before, model(idx, window_tokens=32, short_window=16))


def test_yarn_follows_the_stage_windows():
    """The trainer's windows list: each growth of the long window once, in tokens; the model's
    attention scale factor is then the product of 1 + 0.2·ln(new/old)."""
    cfg = load_config("gpt2-speedrun")
    assert yarn_windows(0, cfg) == [384]
    assert yarn_windows(847, cfg) == [384, 896, 1408]
    assert yarn_windows(1284, cfg) == [384, 896, 1408, 1664]
    torch.manual_seed(0)
    model = GPT(small())
    model.set_yarn([384, 896, 1408])
    expected = (1 + 0.2 * math.log(896 / 384)) * (1 + 0.2 * math.log(1408 / 896))
    assert model.yarn_scale.item() == pytest.approx(expected, rel=1e-6)
    assert int(model.yarn_window) == 1408


def test_the_record_unties_after_step_847():
    assert untie_step(load_config("gpt2-speedrun")) == 847
    assert untie_step(load_config("gpt2-speedrun", overrides=["optim.adam_update_every=1"])) == 847
    assert untie_step(load_config("tiny")) == 121  # stage 3 starts at 120, an even step


# tiny shrunk for a Trainer on CPU: 8 steps of 128-token sequences in four stages, the record's layout at 4 blocks
SHRUNK_TINY = ["train.compile=false", "train.steps=8", "stages.ends=[2, 4, 6]", "stages.seq_len=[128, 128, 128, 128]",
               "stages.max_doc_len=[64, 128, 128, 128]", "stages.batch_tokens=[256, 512, 768, 768]", *TINY_4_BLOCKS]


def test_training_ties_the_head_until_the_untie_step_then_copies_its_moments():
    """A shrunk tiny on CPU: the embedding equals the head after every tied step; after the
    untie step its Adam moments are the head's and the two then move apart."""
    from speedrun.distributed import setup
    from speedrun.train import Trainer

    cfg = load_config("tiny", overrides=SHRUNK_TINY)
    trainer = Trainer(cfg, setup("cpu"), "test")
    head, embed = trainer.model.lm_head.weight, trainer.model.wte.weight
    assert untie_step(cfg) == 5
    for step in range(8):
        trainer.train_step(step)
        if step <= 5:
            assert torch.equal(head, embed), step
        if step == 5:
            adam = next(o for o in trainer.optimizers if any(p is head for g in o.param_groups for p in g["params"]))
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(adam.state[embed][key], adam.state[head][key])
    assert not torch.equal(head, embed)


def test_bf16_activations_train_the_tied_head():
    """With bf16 activations, as on CUDA, the tied token embedding stays float32 like the head, so
    the tied steps can fold its gradient into the head's (gpt2-speedrun once inherited the 2025
    record's bf16 embedding tables, and its first step on a GPU would have failed); bf16 tables with
    a tied head are refused in one line."""
    from speedrun.config import ConfigError
    from speedrun.distributed import setup
    from speedrun.train import Trainer

    cfg = load_config("tiny", overrides=[*SHRUNK_TINY, "model.activation_dtype=bfloat16"])
    trainer = Trainer(cfg, setup("cpu"), "test")
    head, embed = trainer.model.lm_head.weight, trainer.model.wte.weight
    assert head.dtype == embed.dtype == torch.float32
    losses = torch.stack([trainer.train_step(step) for step in range(2)])
    assert losses.isfinite().all() and torch.equal(head, embed)
    with pytest.raises(ConfigError, match="bf16_embeddings"):
        load_config("gpt2-speedrun", overrides=["model.bf16_embeddings=true"])


def test_a_saved_model_loads_with_its_derived_buffers(tmp_path):
    """Weights saved and loaded the way loading.load_model does (built on the meta device): the
    bigram sign table, not saved, is refilled, and YaRN's saved state comes back; same logits."""
    from safetensors.torch import save_model

    from speedrun.loading import _build

    cfg = load_config("gpt2-speedrun", overrides=SMALL)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        model.bigram.table.weight.normal_()
    model.set_yarn([128, 256])
    save_model(model, str(tmp_path / "model.safetensors"))
    loaded = _build(cfg, tmp_path / "model.safetensors", torch.device("cpu"))
    idx = tokens()
    kw = dict(window_tokens=32, short_window=16)
    assert torch.equal(loaded.bigram.signs, model.bigram.signs)
    assert int(loaded.yarn_window) == 256
    torch.testing.assert_close(loaded(idx, **kw), model.eval()(idx, **kw), rtol=0, atol=0)


def test_the_record_preset_gives_every_adam_group_the_record_numbers():
    """record-2026.md §4, role by role: lr, betas and weight decay of each parameter group."""
    from speedrun.optim import param_groups

    cfg = load_config("gpt2-speedrun")
    with torch.device("meta"):
        model = GPT(cfg.model)
    groups = {g["role"]: g for g in param_groups(model.param_groups(), cfg.optim)}
    expected = {  # role: (lr, betas, weight decay)
        "head": (0.008, (0.5, 0.95), 0.75), "embed": (0.008, (0.5, 0.95), 0.75),
        "value_embed": (0.6, (0.75, 0.95), 0.025), "scalar": (0.04, (0.9, 0.99), 0.0),
        "smear": (8e-5, (0.9, 0.99), 0.0), "gate": (0.008, (0.9, 0.99), 0.005),
        "resid": (0.04, (0.9, 0.95), 0.0), "branch": (0.008, (0.9, 0.95), 0.0),
        "mudd": (0.002, (0.9, 0.99), 0.005), "mudd_bias": (0.002, (0.9, 0.99), 0.0),
        "gate_gen": (0.0008, (0.9, 0.99), 0.005), "gate_gen_bias": (0.0008, (0.9, 0.99), 0.0),
    }
    assert set(groups) == set(expected) | {"hidden"}
    for role, (lr, betas, decay) in expected.items():
        g = groups[role]
        assert (g["kind"], g["lr"], g["betas"], g["weight_decay"]) == ("adam", lr, betas, decay), role
    assert groups["hidden"]["kind"] == "normuon" and groups["hidden"]["lr"] == 0.023
    # the bigram table trains with the value embeddings, the smear λ and skip logit with the scalars
    value_embed = {id(p) for p in groups["value_embed"]["params"]}
    assert id(model.bigram.table.weight) in value_embed
    scalars = {id(p) for p in groups["scalar"]["params"]}
    assert id(model.smear.strength) in scalars and id(model.skip_logits) in scalars


@pytest.mark.gpu
def test_the_2026_model_trains_compiled_on_cuda_against_float32():
    """The whole 2026 model as `speedrun train` runs it on a GPU: compiled, bf16 activations,
    FlexAttention with varlen and paired-head masks, the FP8 MLP and head where the GPU has FP8.
    Its loss is within bf16/FP8 distance of an eager float32 copy, its gradients are finite, and a
    second step with other loss weights and YaRN state compiles nothing new."""
    from speedrun.config import Config, TrainConfig
    from speedrun.prepare import prepare

    cfg = load_config("gpt2-speedrun", overrides=[*SMALL, "model.zero_init_proj=false"]).model
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
        model.bigram.table.weight.normal_()
    reference = copy.deepcopy(model).cuda()
    run = prepare(model, Config(model=cfg, train=TrainConfig(compile=True)), torch.device("cuda"), "train")
    idx = tokens(T=256).cuda()
    kw = dict(window_tokens=torch.tensor(128, device="cuda"), short_window=torch.tensor(64, device="cuda"))
    weights = torch.tensor([1.0, 0.5], device="cuda")
    loss = run(idx, idx, future_weights=weights, **kw)
    loss.backward()
    expected = reference(idx, idx, future_weights=weights, **kw)
    assert abs(loss.item() - expected.item()) < 0.05 * expected.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.set_yarn([128, 256])
    with Compiles() as compiled:
        run(idx, idx, future_weights=torch.tensor([1.0, 0.25], device="cuda"), **kw).backward()
    assert not compiled.frames, compiled.frames


def test_a_regions_run_rotates_q_and_k_compiled_in_training_and_eagerly_without_grad(monkeypatch):
    """Attention.compiled (a CPU run's regions) takes the compiled norm and rotation only where grad
    is on: validation under no_grad would compile a second graph for almost no gain."""
    import speedrun.model as model_module
    from speedrun.model import Attention, position_qk

    calls = []
    def recording(*args):
        calls.append(torch.is_grad_enabled())
        return position_qk(*args)
    monkeypatch.setattr(model_module, "_compiled_position_qk", lambda: recording)
    model = prepared(GPT(small()))
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attention:
        m.compiled = True
    idx = tokens()
    with torch.no_grad():
        model(idx, idx)
    assert calls == []
    model(idx, idx).backward()
    assert calls == [True] * len(attention)
