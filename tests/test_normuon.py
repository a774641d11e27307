import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import speedrun.optim.orthogonalize as orthogonalize_module
from speedrun import checkpoint
from speedrun.config import load_config
from speedrun.distributed import Runtime
from speedrun.model import GPT
from speedrun.optim import Muon, NorMuon, build_optimizers
from speedrun.optim.orthogonalize import POLAR_EXPRESS_COEFFICIENTS, polar_express


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tagged(t, layout):
    """t with the model's tag for NorMuon (none for a plain matrix)."""
    if layout is not None:
        t.matrix_layout = layout
    return t


# -- Polar Express --------------------------------------------------------------------------------

def _polar_express_float64(G, coefficients=POLAR_EXPRESS_COEFFICIENTS):
    """The record's iteration written out in float64: the same normalisation and coefficients."""
    X = G.double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in coefficients:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * A @ A
        X = a * X + (X @ B if tall else B @ X)
    return X


def _relative_error(X, reference):
    return ((X.double() - reference).norm(dim=(-2, -1)) / reference.norm(dim=(-2, -1))).max().item()


SHAPES = {"wide": (64, 256), "tall": (256, 64), "square": (96, 96), "batched": (3, 32, 96)}


def test_polar_express_coefficients_target_band():
    # The five quintics composed map every singular value in [1e-3, 1] (after the 1.02 margin) into
    # [0.847, 1.141] (measured): they trade exact convergence for lifting small values in 5 steps.
    x = torch.logspace(-3, 0, 4001, dtype=torch.float64) / 1.02
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        x = a * x + b * x ** 3 + c * x ** 5
    assert 0.84 < x.min() and x.max() < 1.15


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_polar_express_matches_float64_reference(shape):
    # Five bf16 iterations lose more than bf16's 0.4%: each amplifies the rounding error of the
    # small singular directions. Over 40 random matrices of these shapes the error was at most 4.1%;
    # normalising by 1.0 instead of 1.02 moves the result by at least 7.8% from the reference.
    for seed in range(4):
        G = _randn(shape, seed)
        X = polar_express(G)
        assert X.dtype == torch.bfloat16 and X.shape == G.shape
        assert _relative_error(X, _polar_express_float64(G.bfloat16())) < 0.06


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_polar_express_in_float32_matches_float64_reference(shape):
    # optim.orthogonalize_dtype = float32 (a CPU without fast bf16): measured within 3.3e-6 of the
    # float64 iterations over these shapes, where bf16 is 1.5-4% away
    for seed in range(2):
        G = _randn(shape, seed)
        X = polar_express(G, torch.float32)
        assert X.dtype == torch.float32 and X.shape == G.shape
        assert _relative_error(X, _polar_express_float64(G)) < 1e-4


@pytest.mark.parametrize("shape", [SHAPES["wide"], SHAPES["tall"]], ids=["wide", "tall"])
@pytest.mark.parametrize("i", range(5))
def test_each_polar_express_iteration_matches_float64_reference(i, shape, monkeypatch):
    # One iteration alone is within bf16 rounding of the reference (at most 0.64% measured), which
    # pins down each coefficient, the normalisation and the wide/tall forms.
    one = POLAR_EXPRESS_COEFFICIENTS[i:i + 1]
    monkeypatch.setattr(orthogonalize_module, "POLAR_EXPRESS_COEFFICIENTS", one)
    G = _randn(shape, i)
    assert _relative_error(polar_express(G), _polar_express_float64(G.bfloat16(), one)) < 0.01


def _spectrum_in_design_interval(m, n, seed, batch=()):
    """U diag(s) V^T with s log-spaced from 1 down to 1e-3 of the normaliser 1.02·‖s‖, the interval
    the coefficients were computed for."""
    k = min(m, n)
    s = torch.logspace(0, -3, k, dtype=torch.float64)
    for _ in range(20):  # fixed point of s_min = 1e-3 · 1.02 · ‖s‖
        s = torch.logspace(0, math.log10(1e-3 * 1.02 * s.norm().item()), k, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    return ((u * s) @ v.mT).float()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_polar_express_singular_values_in_band(shape):
    # In float64 these spectra land in [0.847, 1.141] (the band above); bf16 rounding widens it, most
    # at the small end (measured [0.81, 1.144] over 15 matrices), so [0.75, 1.2] leaves a margin.
    *batch, m, n = shape
    s = torch.linalg.svdvals(polar_express(_spectrum_in_design_interval(m, n, 0, tuple(batch))).double())
    assert s.min() > 0.75 and s.max() < 1.2, (s.min().item(), s.max().item())


def test_muon_can_use_polar_express():
    p = torch.zeros(64, 16, requires_grad=True)
    p.grad = _randn((64, 16), 0)
    Muon([p], lr=0.1, momentum=0.95, orthogonalizer="polar_express").step()
    expected = -0.1 * 2.0 * polar_express(p.grad.lerp(0.05 * p.grad, 0.95)).float()
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        Muon([p], orthogonalizer="svd")


# -- NorMuon against a reference written out per matrix ---------------------------------------------

def _blocks(layout, shape):
    """The 2-D matrices of a parameter as the record sees them: (select, lr multiplier), select
    returning a 2-D view of a parameter-shaped tensor."""
    if layout == "qkv":  # head_dim 8: four heads, so two head pairs of 16 rows each in q and in k
        return [(lambda x, i=i, j=j: x[i, 16 * j:16 * (j + 1)], 1.0) for i in (0, 1) for j in (0, 1)] + \
               [(lambda x: x[2], 1.0)]
    if layout == "mlp_out":  # stored (model_dim, hidden), seen transposed; lr_mul_mlp_out 2
        return [(lambda x: x.T, 2.0)]
    return [(lambda x: x, 1.0)]


def _reference(p0, grads, blocks, lr, wd, cautious, momentum=0.9, beta2=0.9):
    """NorMuon on one parameter, each matrix on its own: Nesterov momentum (fp32), Polar Express
    (the tested polar_express), then in float64 per-row/column variance reduction with the Frobenius
    norm restored, weight decay, and the update with lr·sqrt(max(1, m/n))·multiplier."""
    p, buf = p0.double(), torch.zeros_like(p0)
    V = [None] * len(blocks)
    for g in grads:
        # fp32 momentum, as the record: Polar Express sees the same bf16 input as in NorMuon
        buf = torch.lerp(buf, g, 1 - momentum)
        nesterov = torch.lerp(g, buf, momentum)
        new = p.clone()
        for i, (select, mul) in enumerate(blocks):
            O = polar_express(select(nesterov)).double()
            m, n = O.shape
            r = (O ** 2).mean(dim=1 if m >= n else 0, keepdim=True)
            V[i] = (1 - beta2) * r if V[i] is None else beta2 * V[i] + (1 - beta2) * r
            OD = O / V[i].clamp_min(1e-10).sqrt()
            U = OD * O.norm() / OD.norm()
            lr_eff = lr * max(1.0, m / n) ** 0.5 * mul
            w = select(p)
            decay = lr_eff * lr * wd * (U * w >= 0) * w if cautious else lr * wd * w
            select(new).copy_(w - decay - lr_eff * U)
        p = new
    return p


CASES = {"tall": ((96, 32), None), "wide": ((32, 96), None), "qkv": ((3, 32, 24), ("qkv", 8)),
         "mlp_out": ((24, 96), ("mlp_out",))}


@pytest.mark.parametrize("cautious", [True, False], ids=["cautious", "decoupled"])
@pytest.mark.parametrize("case", CASES.keys())
def test_normuon_matches_reference(case, cautious):
    shape, layout = CASES[case]
    lr, wd = 0.05, 1.2
    p = _tagged(_randn(shape, 0).requires_grad_(), layout)
    p0 = p.detach().clone()
    grads = [_randn(shape, 10 + step) for step in range(3)]
    opt = NorMuon([p], lr=lr, momentum=0.9, beta2=0.9, weight_decay=wd, qk_blocks="head_pair", lr_mul_mlp_out=2.0,
                  weight_decay_mode="cautious" if cautious else "decoupled")
    for g in grads:
        p.grad = g
        opt.step()
    want = _reference(p0, grads, _blocks(case, shape), lr, wd, cautious)
    assert (want - p0.double()).abs().max() > 0.05  # the steps moved the weights well beyond the tolerance
    torch.testing.assert_close(p.detach().double(), want, atol=2e-6, rtol=0)


def test_cautious_decay_only_where_update_and_weight_agree_in_sign():
    # Two runs from the same weights and gradient, with and without decay: their difference is the
    # decay, and the run without it gives the update. A gradient column that is zero stays zero
    # through Polar Express (wide: X <- aX + BX) and normalisation, so there update·w = 0: the
    # record's mask (update·w >= 0) decays it, a strict one would not.
    p0 = _randn((16, 48), 0)
    grad = _randn((16, 48), 1)
    grad[:, 5] = 0
    lr, wd = 0.05, 1.2
    runs = {}
    for decay in (0.0, wd):
        p = p0.clone().requires_grad_()
        p.grad = grad
        NorMuon([p], lr=lr, weight_decay=decay, weight_decay_mode="cautious").step()
        runs[decay] = p.detach()
    update = (p0 - runs[0.0]) / lr  # lr_eff = lr for a wide matrix
    decayed = runs[0.0] - runs[wd]
    mask = update * p0 >= 0
    assert mask.any() and (~mask).any()
    assert torch.equal(decayed[~mask], torch.zeros_like(decayed[~mask]))
    torch.testing.assert_close(decayed[mask], lr * lr * wd * p0[mask], atol=0, rtol=1e-4)
    assert torch.equal(update[:, 5], torch.zeros(16)) and (decayed[:, 5] != 0).all()


# -- the record's lrs and matrices ----------------------------------------------------------------

RECORD_NORMUON = ["optim.hidden_optimizer=normuon", "optim.orthogonalizer=polar_express", "optim.qk_blocks=head_pair",
                  "optim.weight_decay_mode=cautious", "optim.lr_hidden=0.023", "optim.weight_decay=1.2",
                  "optim.lr_mul_mlp_out=2.0"]


def _tiny_normuon():
    cfg = load_config("tiny-2025", overrides=RECORD_NORMUON)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    return model, build_optimizers(model.param_groups(), cfg.optim)


def test_effective_lrs_of_the_tiny_model():
    model, opts = _tiny_normuon()
    (opt,) = [o for o in opts if isinstance(o, NorMuon)]
    (group,) = opt.param_groups

    def lrs(p):
        return [(tuple(m.select(p.detach()).shape), round(group["lr"] * m.lr_mul, 6)) for m in opt.matrices(p)]

    for block in model.blocks:
        # two heads of 64: Q and K one head pair each (2 blocks of 128×128), V one matrix
        assert lrs(block.attn.qkv) == [((2, 128, 128), 0.023), ((1, 128, 128), 0.023)]
        assert lrs(block.attn.proj.weight) == [((1, 128, 128), 0.023)]
        assert lrs(block.mlp.fc.weight) == [((1, 512, 128), 0.046)]
        assert lrs(block.mlp.proj.weight) == [((1, 512, 128), 0.092)]  # transposed: sqrt(4) · 2


def test_record_attention_splits_into_head_pairs():
    qkv = _tagged(torch.empty(3, 768, 768, device="meta"), ("qkv", 128))  # six heads of 128, as the record
    shapes = {blocks: [tuple(m.select(qkv).shape) for m in NorMuon([qkv], qk_blocks=blocks).matrices(qkv)]
              for blocks in ("head_pair", "matrix")}
    assert shapes == {"head_pair": [(6, 256, 768), (1, 768, 768)], "matrix": [(3, 768, 768)]}


def test_layout_settings_need_the_model_tags():
    cfg = load_config("tiny-2025", overrides=RECORD_NORMUON).optim
    with pytest.raises(ValueError, match="matrix_layout"):  # e.g. a deep-copied model: the tags are gone
        build_optimizers({"hidden": [torch.zeros(8, 8, requires_grad=True)]}, cfg)
    with pytest.raises(ValueError, match="even number of heads"):
        NorMuon([_tagged(torch.zeros(3, 24, 8, requires_grad=True), ("qkv", 8))])  # three heads


def test_training_steps_reduce_the_loss():
    model, opts = _tiny_normuon()
    assert [type(o).__name__ for o in opts][-1] == "NorMuon"
    idx = torch.randint(0, 50257, (2, 65), generator=torch.Generator().manual_seed(0))
    hidden = [p for o in opts if isinstance(o, NorMuon) for p in o.param_groups[0]["params"]]
    before = [p.detach().clone() for p in hidden]
    losses = []
    for _ in range(4):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(not torch.equal(p, q) for p, q in zip(hidden, before))


# -- bf16 weights with their low bits ---------------------------------------------------------------

def _as_fp32(p, low_bits):
    return ((p.view(torch.int16).to(torch.int32) << 16) | low_bits.to(torch.int32)).view(torch.float32)


def _truncated(master):
    return (master.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def _mixed_setup(dtype):
    params = [_tagged(_randn(shape, i, torch.bfloat16).to(dtype).requires_grad_(), layout)
              for i, (shape, layout) in enumerate(CASES.values())]
    return params, NorMuon(params, lr=0.05, weight_decay=1.2)


def _mixed_step(params, opt, step):
    for i, p in enumerate(params):
        p.grad = _randn(p.shape, 100 * step + i, torch.bfloat16).to(p.dtype)
    opt.step()


def test_bf16_weights_follow_fp32_bit_for_bit():
    bf16, opt16 = _mixed_setup(torch.bfloat16)
    fp32, opt32 = _mixed_setup(torch.float32)
    for step in range(3):
        _mixed_step(bf16, opt16, step)
        _mixed_step(fp32, opt32, step)
        for p, q in zip(bf16, fp32):
            low_bits = opt16.state[p]["low_bits"]
            assert low_bits.dtype == torch.uint16
            assert torch.equal(_as_fp32(p.detach(), low_bits), q.detach())
            assert torch.equal(p.detach(), _truncated(q.detach()))
    assert any((opt16.state[p]["low_bits"].to(torch.int32) != 0).any() for p in bf16)  # the low bits are used


def test_bf16_state_resumes_through_a_checkpoint(tmp_path):
    # checkpoint.py's own save and restore; torch's load_state_dict alone would cast the fp32
    # moments and the uint16 low bits to the parameters' bf16
    params, opt = _mixed_setup(torch.bfloat16)
    for step in range(2):
        _mixed_step(params, opt, step)
    torch.save({"optimizers": [checkpoint._owned_state(opt)], "rng_cpu": torch.get_rng_state()}, tmp_path / "rank.pt")
    resumed = [_tagged(p.detach().clone().requires_grad_(), getattr(p, "matrix_layout", None)) for p in params]
    opt2 = NorMuon(resumed, lr=0.05, weight_decay=1.2)
    cpu = torch.device("cpu")
    checkpoint._restore([checkpoint._load_tensors(tmp_path / "rank.pt", cpu)], [opt2], Runtime(0, 1, 0, cpu))
    assert opt2.state[resumed[0]]["momentum_buffer"].dtype == torch.float32
    for step in range(2, 4):
        _mixed_step(params, opt, step)
        _mixed_step(resumed, opt2, step)
    assert all(torch.equal(p, q) for p, q in zip(resumed, params))


# -- sharded NorMuon ------------------------------------------------------------------------------

# Buckets of 5, 3 and 2 parameters in one group (plain, qkv in head pairs, bf16 mlp_out), and a
# second group with a parameter whose grad stays None: no count divides evenly by 2 or 3 everywhere.
SHARDED = ([((16, 32), None, torch.float32)] * 5 + [((3, 32, 24), ("qkv", 8), torch.float32)] * 3
           + [((24, 96), ("mlp_out",), torch.bfloat16)] * 2
           + [((24, 24), None, torch.float32), ((8, 8), None, torch.float32)])
FIRST_GROUP, NO_GRAD = 10, 11


def _sharded_setup(values=None):
    """The parameters (from `values` if given) and their NorMuon, in two groups."""
    params = [_tagged((_randn(shape, i) if values is None else values[i]).to(dtype).requires_grad_(), layout)
              for i, (shape, layout, dtype) in enumerate(SHARDED)]
    groups = [dict(params=params[:FIRST_GROUP]), dict(params=params[FIRST_GROUP:], lr=0.01)]
    return params, NorMuon(groups, lr=0.05, momentum=0.9, weight_decay=1.2)


def _local_grad(shape, seed, dtype, rank, world_size):
    """Rank `rank`'s share of a gradient whose mean over the ranks is a tensor of eighths in
    [-15/8, 15/8]: the ranks differ by halves around it, so every partial sum of a reduce-scatter,
    in any order and in bf16 too, and its division by the world size are exact."""
    mean = torch.randint(-15, 16, shape, generator=torch.Generator().manual_seed(seed)) / 8
    return (mean + (rank - (world_size - 1) / 2) * 0.5).to(dtype)


def _sharded_steps(params, opt, steps, rank=0, world_size=1):
    for step in steps:
        for i, p in enumerate(params):
            p.grad = None if i == NO_GRAD else _local_grad(p.shape, 1000 * step + i, p.dtype, rank, world_size)
        for group in opt.param_groups:
            group["momentum"] = 0.85 + 0.02 * step
        opt.step()


def _union(results):
    union = copy.deepcopy(results[0]["state"])
    for r in results[1:]:
        union["state"].update(r["state"]["state"])
    return union


def _sharded_worker(rank, world_size, tmp, resume_from):
    """Five steps at `world_size`, saving the state at step 3; with `resume_from` (directory, world
    size), also resume step 3 of a run saved at another world size."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        params, opt = _sharded_setup()
        _sharded_steps(params, opt, range(3), rank, world_size)
        state, at_three = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
        owned = [i for i, p in enumerate(params) if opt.owns(p)]
        _sharded_steps(params, opt, range(3, 5), rank, world_size)
        result = dict(params=[p.detach() for p in params], state=state, owned=owned, at_three=at_three)
        if resume_from:
            saved = [torch.load(f"{resume_from[0]}/rank{r}.pt") for r in range(resume_from[1])]
            resumed, opt2 = _sharded_setup(saved[0]["at_three"])
            opt2.load_state_dict(_union(saved))
            _sharded_steps(resumed, opt2, range(3, 5), rank, world_size)
            result["resumed"] = [p.detach() for p in resumed]
        torch.save(result, f"{tmp}/rank{rank}.pt")
        dist.barrier()  # every rank done with gloo before any tears it down (see test_optim's worker)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_normuon_equals_single_process_and_resumes_at_any_world_size(tmp_path):
    (tmp_path / "w3").mkdir()
    (tmp_path / "w2").mkdir()
    mp.spawn(_sharded_worker, args=(3, str(tmp_path / "w3"), None), nprocs=3)
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "w2"), (str(tmp_path / "w3"), 3)), nprocs=2)
    runs = {W: [torch.load(tmp_path / f"w{W}" / f"rank{r}.pt") for r in range(W)] for W in (2, 3)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so bf16 matmuls block the same way
    try:
        params, opt = _sharded_setup()
        _sharded_steps(params, opt, range(5))
        want = [p.detach() for p in params]
        for W, results in runs.items():
            for r in results:
                assert all(torch.equal(got, w) for got, w in zip(r["params"], want)), W
            assert sorted(i for r in results for i in r["owned"]) == list(range(len(SHARDED)))  # one owner each
            for r in results:
                assert set(r["state"]["state"]) <= set(r["owned"])
        for r in runs[2]:  # saved at world size 3, resumed at 2
            assert all(torch.equal(got, w) for got, w in zip(r["resumed"], want))
        # saved at world size 2, resumed in one process
        resumed, opt2 = _sharded_setup(runs[2][0]["at_three"])
        opt2.load_state_dict(_union(runs[2]))
        _sharded_steps(resumed, opt2, range(3, 5))
        assert all(torch.equal(got.detach(), w) for got, w in zip(resumed, want))
    finally:
        torch.set_num_threads(threads)


def test_a_bucket_steps_together_as_each_parameter_alone():
    """One process updates a bucket's parameters as one batch per matrix shape; each ends bit for
    bit where a NorMuon of its own takes it, the MLP's input and (transposed) output projection,
    which share a bucket with different lr multipliers, included."""
    shapes = [((96, 24), None), ((96, 24), None), ((24, 96), ("mlp_out",)), ((3, 32, 24), ("qkv", 8)),
              ((3, 32, 24), ("qkv", 8)), ((16, 16), None)]
    make = lambda: [_tagged(_randn(shape, i).requires_grad_(), layout) for i, (shape, layout) in enumerate(shapes)]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=1.2, qk_blocks="head_pair", lr_mul_mlp_out=2.0)
    together, alone = make(), make()
    opt = NorMuon(together, **settings)
    opts = [NorMuon([p], **settings) for p in alone]
    assert len({opt.bucket_key(p) for p in together}) == 3
    for step in range(3):
        for params in (together, alone):
            for i, p in enumerate(params):
                p.grad = _randn(p.shape, 100 * step + i)
        opt.step()
        for o in opts:
            o.step()
    for a, b in zip(together, alone):
        assert torch.equal(a.detach(), b.detach())
