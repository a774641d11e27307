import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speedrun.config import Config, OptimConfig, TrainConfig, load_config
import speedrun.prepare
from speedrun.optim import Muon, apply_schedule, build_optimizers, lr_multiplier, muon_momentum, newton_schulz
from speedrun.optim.orthogonalize import orthogonalize_dtype


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _feed(params, step):
    """Deterministic gradients for `step`, the same in every process."""
    for i, p in enumerate(params):
        p.grad = _randn(p.shape, 1000 * step + i)


# -- newton_schulz --------------------------------------------------------------------------------

def _ill_conditioned(n, cond, seed):
    u, _ = torch.linalg.qr(_randn((n, n), seed))
    v, _ = torch.linalg.qr(_randn((n, n), seed + 1))
    return u @ torch.diag(torch.logspace(0, -math.log10(cond), n)) @ v.T


@pytest.mark.parametrize("G", [_randn((32, 128), 1), _randn((128, 32), 2), _randn((3, 32, 48), 3),
                               _ill_conditioned(64, 100.0, 4)],
                         ids=["wide", "tall", "batched", "ill-conditioned"])
def test_newton_schulz_singular_values(G):
    X = newton_schulz(G, 5)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min().item(), s.max().item())


def test_newton_schulz_random_square():
    # A random square matrix has a few singular values near zero; five steps lift small values only
    # about 3.4445**5 ~ 500-fold, so those stay small. Everything else lands in [0.5, 1.5].
    s = torch.linalg.svdvals(newton_schulz(_randn((64, 64), 0), 5).double())
    assert s.max() < 1.5 and (s > 0.5).float().mean() > 0.95


def test_newton_schulz_batches_and_transposes():
    G = _randn((3, 24, 40), 5)
    batched = newton_schulz(G, 5).float()
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], 5).float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(newton_schulz(G.mT, 5).float(), batched.mT, atol=1e-2, rtol=0)


# -- Muon, one process ----------------------------------------------------------------------------

SHAPES = [(32, 64), (96, 32), (48, 48)]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("torch_ns", [True, False], ids=["torch-ns", "our-ns"])
def test_muon_matches_torch_muon(nesterov, weight_decay, torch_ns, monkeypatch):
    # torch.optim.Muon (2-D only) and ours share the coefficients, bf16 iterate, transpose rule,
    # buffer.lerp_ momentum, sqrt(max(1, rows/cols)) lr factor and decoupled weight decay with the
    # unscaled lr. Its Newton-Schulz clamps the norm at eps where we add eps, and fuses
    # b*A + c*A@A and a*X + B@X into addmm, which rounds differently in bf16: a few percent per
    # update. So: with its own iteration, agree to bf16 tolerance; with ours swapped in, exactly.
    if not torch_ns:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                            lambda grad, coefficients, steps, eps: newton_schulz(grad, steps))
    lr = 0.02
    ours = [_randn(s, i).requires_grad_() for i, s in enumerate(SHAPES)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = Muon(ours, lr=lr, momentum=0.95, nesterov=nesterov, ns_steps=5, weight_decay=weight_decay)
    ref = torch.optim.Muon(theirs, lr=lr, momentum=0.95, nesterov=nesterov, ns_steps=5,
                           adjust_lr_fn="original", weight_decay=weight_decay)
    for step in range(5):
        _feed(ours, step)
        _feed(theirs, step)
        opt.step()
        ref.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved = q.detach() - p0
        assert moved.abs().max() > lr  # the comparison is not vacuous
        if torch_ns:
            assert (p.detach() - q.detach()).norm() < 0.05 * moved.norm()
        else:
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=0)


def test_muon_3d_parameter_is_a_batch_of_matrices():
    fused = _randn((3, 32, 8), 0).requires_grad_()
    parts = [fused.detach()[i].clone().requires_grad_() for i in range(3)]
    opt_fused, opt_parts = Muon([fused], lr=0.05), Muon(parts, lr=0.05)
    for step in range(3):
        _feed([fused], step)
        for i, p in enumerate(parts):
            p.grad = fused.grad[i].clone()
        opt_fused.step()
        opt_parts.step()
    torch.testing.assert_close(fused.detach(), torch.stack([p.detach() for p in parts]), atol=2e-3, rtol=0)


def test_muon_lr_scale_and_first_step():
    # From zero momentum with nesterov, the first update is NS(g.lerp(0.05 g, 0.95)), scaled by sqrt(rows / cols).
    p = torch.zeros(64, 16, requires_grad=True)
    p.grad = _randn((64, 16), 0)
    Muon([p], lr=0.1, momentum=0.95).step()
    expected = -0.1 * 2.0 * newton_schulz(p.grad.lerp(0.05 * p.grad, 0.95), 5).float()
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_muon_skips_params_without_grad_and_rejects_vectors():
    p, q = _randn((8, 8), 0).requires_grad_(), _randn((8, 8), 1).requires_grad_()
    before = q.detach().clone()
    opt = Muon([p, q], lr=0.05)
    _feed([p], 0)
    opt.step()
    assert torch.equal(q.detach(), before) and q not in opt.state
    with pytest.raises(ValueError):
        Muon([torch.zeros(4, requires_grad=True)])


def test_muon_state_dict_resumes_exactly():
    params = [_randn(s, i).requires_grad_() for i, s in enumerate(SHAPES)]
    opt = Muon(params, lr=0.05)
    for step in range(2):
        _feed(params, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = Muon(resumed, lr=0.05)
    opt2.load_state_dict(saved)
    assert all(opt.owns(p) for p in params)
    for step in range(2, 4):
        _feed(params, step)
        _feed(resumed, step)
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


RECORD = load_config("gpt2-speedrun-2025").optim  # Muon for the hidden matrices, the record's Adam settings


# -- schedules ------------------------------------------------------------------------------------

def test_trapezoid_schedule():
    cfg = OptimConfig(schedule="trapezoid", cooldown_frac=0.4, final_lr_frac=0.1, warmup_steps=0)
    values = {s: lr_multiplier(s, 100, cfg) for s in (0, 30, 60, 80, 100)}
    assert values == pytest.approx({0: 1.0, 30: 1.0, 60: 1.0, 80: 0.55, 100: 0.1})
    cfg.warmup_steps = 10
    assert [lr_multiplier(s, 100, cfg) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert lr_multiplier(100, 100, OptimConfig(schedule="trapezoid", cooldown_frac=0.0, warmup_steps=0)) == 1.0


def test_cosine_schedule():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, final_lr_frac=0.0)
    values = [lr_multiplier(s, 110, cfg) for s in (0, 9, 10, 60, 110)]
    assert values == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0], abs=1e-12)
    cfg.final_lr_frac, cfg.warmup_steps = 0.1, 0
    assert [lr_multiplier(s, 100, cfg) for s in (0, 50, 100)] == pytest.approx([1.0, 0.55, 0.1])


def test_muon_momentum_warmup():
    cfg = OptimConfig(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=300)
    assert [muon_momentum(s, cfg) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum(0, OptimConfig(muon_momentum_warmup_steps=0)) == 0.95


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, OptimConfig(schedule="step"))


# -- build_optimizers -----------------------------------------------------------------------------

def _groups(tied=False):
    groups = {"hidden": [torch.zeros(8, 16), torch.zeros(3, 8, 8)], "embed": [torch.zeros(50, 8), torch.zeros(50, 8)],
              "head": [torch.zeros(50, 8)], "scalar": [torch.zeros(4), torch.zeros(())]}
    if tied:
        del groups["head"]
    return {k: [p.requires_grad_() for p in v] for k, v in groups.items()}


def _placement(opts):
    """id(param) -> (optimizer index, its group), asserting no parameter appears twice."""
    where = {}
    for i, opt in enumerate(opts):
        for group in opt.param_groups:
            for p in group["params"]:
                assert id(p) not in where
                where[id(p)] = (i, group)
    return where


@pytest.mark.parametrize("tied", [False, True])
def test_build_optimizers_muon_mode(tied):
    cfg = dataclasses.replace(RECORD, weight_decay=0.01)
    groups = _groups(tied)
    opts = build_optimizers(groups, cfg, fused=False)
    assert isinstance(opts[0], torch.optim.Adam) and isinstance(opts[1], Muon) and len(opts) == 2
    where = _placement(opts)
    assert len(where) == sum(len(v) for v in groups.values())
    lrs = {"hidden": cfg.lr_hidden, "embed": cfg.lr_embed, "head": cfg.lr_head, "scalar": cfg.lr_scalar}
    for name, params in groups.items():
        for p in params:
            i, group = where[id(p)]
            assert i == (1 if name == "hidden" else 0)
            assert group["lr"] == group["base_lr"] == lrs[name]
            assert group["weight_decay"] == (0.0 if name == "scalar" else 0.01)
    adam, muon = opts[0].param_groups[0], opts[1].param_groups[0]
    assert adam["betas"] == (0.8, 0.95) and adam["eps"] == 1e-10
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (0.95, True, 5)


def test_build_optimizers_adamw_mode():
    cfg = OptimConfig(hidden_optimizer="adam", lr_hidden=6e-4, lr_head=6e-4, lr_embed=6e-4, lr_scalar=6e-4,
                      weight_decay=0.1, adam_betas=[0.9, 0.95], adam_eps=1e-8)
    groups = _groups()
    (opt,) = build_optimizers(groups, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    where = _placement([opt])
    assert len(where) == sum(len(v) for v in groups.values())
    for p in (p for params in groups.values() for p in params):
        group = where[id(p)][1]
        assert group["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0)
        assert group["lr"] == group["base_lr"] == 6e-4
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8


def test_build_optimizers_rejects_unknown_groups():
    with pytest.raises(ValueError):
        build_optimizers({**_groups(), "extra": [torch.zeros(2, 2)]}, OptimConfig())


def test_apply_schedule_sets_lr_and_momentum():
    cfg = dataclasses.replace(RECORD, muon_momentum_warmup_steps=100)
    opts = build_optimizers(_groups(), cfg)
    apply_schedule(opts, 90, Config(optim=cfg, train=TrainConfig(steps=100)))  # last tenth: lr factor 0.25 + 0.75 * 0.1
    for opt in opts:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(group["base_lr"] * 0.325)
    assert opts[1].param_groups[0]["momentum"] == pytest.approx(0.94)
    assert "momentum" not in opts[0].param_groups[0]


# -- sharded Muon ---------------------------------------------------------------------------------

# Bucket sizes 5 x 512 and 3 x 768 (two shapes) in one group, and a second group holding a
# parameter whose grad stays None: no count below divides evenly by 2 or 3 everywhere.
SHARDED_SHAPES = [(16, 32)] * 5 + [(48, 16), (48, 16), (3, 16, 16)] + [(24, 24), (8, 8)]
NO_GRAD = 9


def _sharded_setup():
    params = [_randn(s, i).requires_grad_() for i, s in enumerate(SHARDED_SHAPES)]
    opt = Muon([dict(params=params[:8]), dict(params=params[8:], lr=0.01)], lr=0.05, momentum=0.9)
    return params, opt


def _sharded_steps(params, opt, steps):
    for step in steps:
        _feed(params, step)
        params[NO_GRAD].grad = None
        for group in opt.param_groups:
            group["momentum"] = 0.85 + 0.02 * step
        opt.step()


def _sharded_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        params, opt = _sharded_setup()
        _sharded_steps(params, opt, range(3))
        state = copy.deepcopy(opt.state_dict())
        owned = [i for i, p in enumerate(params) if opt.owns(p)]
        _sharded_steps(params, opt, range(3, 5))
        torch.save(dict(params=[p.detach() for p in params], state=state, owned=owned), f"{tmp}/rank{rank}.pt")
        # every rank done with gloo before any tears its connections down: a peer closing them
        # while another still uses them aborted a worker once (std::terminate in gloo, CI 2026-11-26)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_muon_equals_single_process(world_size, tmp_path):
    mp.spawn(_sharded_worker, args=(world_size, str(tmp_path)), nprocs=world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so bf16 matmuls block the same way
    try:
        params, opt = _sharded_setup()
        _sharded_steps(params, opt, range(3))
        at_three = [p.detach().clone() for p in params]
        _sharded_steps(params, opt, range(3, 5))

        for r in results:
            for got, want in zip(r["params"], params):
                assert torch.equal(got, want.detach())
        owned = sorted(i for r in results for i in r["owned"])
        assert owned == list(range(len(SHARDED_SHAPES)))  # each parameter has exactly one owner
        for r in results:
            assert set(r["state"]["state"]) <= set(r["owned"])

        # The union of the ranks' states resumes a single-process run exactly.
        union = copy.deepcopy(results[0]["state"])
        for r in results[1:]:
            union["state"].update(r["state"]["state"])
        resumed = [p.clone().requires_grad_() for p in at_three]
        opt2 = Muon([dict(params=resumed[:8]), dict(params=resumed[8:], lr=0.01)], lr=0.05, momentum=0.9)
        opt2.load_state_dict(union)
        _sharded_steps(resumed, opt2, range(3, 5))
        for got, want in zip(resumed, params):
            assert torch.equal(got.detach(), want.detach())
    finally:
        torch.set_num_threads(threads)


def test_every_registered_optimizer_is_a_config_choice_and_back():
    """config.py cannot import the optimizers (they import it), so it lists their names itself."""
    from speedrun import config
    from speedrun.optim import OPTIMIZERS

    assert set(config._CHOICES[("optim", "hidden_optimizer")]) == set(OPTIMIZERS)


@pytest.mark.parametrize("setting,fast_bf16,expected", [("auto", True, torch.bfloat16), ("auto", False, torch.float32),
                                                        ("bfloat16", False, torch.bfloat16), ("float32", True, torch.float32)])
def test_orthogonalize_dtype_is_bf16_where_the_cpu_multiplies_it_fast(monkeypatch, setting, fast_bf16, expected):
    monkeypatch.setattr(speedrun.prepare, "cpu_has_fast_bf16", lambda: fast_bf16)
    roles = {"hidden": [torch.nn.Parameter(torch.randn(8, 4))]}
    (muon,) = build_optimizers(roles, OptimConfig(hidden_optimizer="muon", orthogonalize_dtype=setting))
    assert orthogonalize_dtype(OptimConfig(orthogonalize_dtype=setting), [{"params": roles["hidden"]}]) == expected
    assert muon.orthogonalize_dtype == expected
    roles["hidden"][0].grad = torch.randn(8, 4)
    muon.step()  # the update in that dtype applies to the float32 weight
    assert roles["hidden"][0].dtype == torch.float32 and roles["hidden"][0].isfinite().all()
