"""RecordAdam (the July-2026 record's Adam) against the record's formulas, torch's AdamW, and itself
across a checkpoint; and which optimizer `build` picks."""

import io
import math

import pytest
import torch

from speedrun.config import load_config
from speedrun.optim import adam, param_groups
from speedrun.optim.adam import RecordAdam

SHAPES = [(6, 5), (7,), (2, 3, 4)]
LRS = [0.05, 0.04, 0.03, 0.02, 0.015, 0.01]  # a per-step schedule, so the lr at each update matters


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _params(dtypes=(torch.float32,) * len(SHAPES)):
    return [torch.nn.Parameter(_randn(s, i, d)) for i, (s, d) in enumerate(zip(SHAPES, dtypes))]


def _grads(step):
    return [_randn(s, 100 * step + i) for i, s in enumerate(SHAPES)]


def _run(opt, params, steps):
    """Training-loop order: set the scheduled lr, give grads, step, drop the grads."""
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = LRS[step] * group.get("lr_mult", 1.0)
        for p, g in zip(params, _grads(step)):
            p.grad = g.to(p.dtype)
        opt.step()
        for p in params:
            p.grad = None


def _reference(params, steps, betas, eps, wd, every, cautious):
    """The record's Adam written out: the sum of `every` steps' gradients, bias correction by the
    number of updates k, eps added to sqrt(v), cautious decay lr²·wd or decoupled decay lr·wd.
    Within an ulp or two of RecordAdam, whose kernels may fuse a multiply-add."""
    b1, b2 = betas
    p = [x.detach().clone() for x in params]
    m, v, pending = ([torch.zeros_like(x) for x in p] for _ in range(3))
    k = 0
    for step in steps:
        pending = [s + g for s, g in zip(pending, _grads(step))]
        if (step + 1) % every:
            continue
        k, lr = k + 1, LRS[step]
        step_size = lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        for i, g in enumerate(pending):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = m[i] / (v[i].sqrt() + eps) * step_size
            if cautious:
                p[i] = p[i] - (u + lr * lr * wd * ((u * p[i]) > 0) * p[i])
            else:
                p[i] = p[i] * (1 - lr * wd) - u
        pending = [torch.zeros_like(x) for x in p]
    return p


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("every,mode", [(2, "cautious"), (3, "decoupled"), (1, "cautious")])
def test_matches_the_record_formulas(every, mode, compiled, monkeypatch):
    """Eager, and compiled as a compiled run's trainer builds it (a static graph per size, the
    pending sum folded into the update), here for parameters of any size."""
    monkeypatch.setattr(adam, "COMPILE_MIN_NUMEL", 0)
    params = _params()
    opt = RecordAdam(params, betas=(0.5, 0.95), eps=1e-10, weight_decay=0.75, update_every=every,
                     weight_decay_mode=mode, compiled=compiled)
    _run(opt, params, range(6))
    expected = _reference(_params(), range(6), (0.5, 0.95), 1e-10, 0.75, every, mode == "cautious")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["updates"] == 6 // every and opt.state[p]["steps"] == 6 for p in params)


def test_every_step_decoupled_is_adamw():
    # Equal but for where eps goes: AdamW adds it to sqrt(v)/sqrt(1-β2^k), RecordAdam to sqrt(v).
    # With gradients of order 1 an eps of 1e-10 is far below fp32 resolution either way.
    mine, theirs = _params(), _params()
    _run(RecordAdam(mine, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), mine, range(6))
    _run(torch.optim.AdamW(theirs, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), theirs, range(6))
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_cautious_decay_only_where_update_and_weight_agree_in_sign():
    # At k = 1 the update is lr·g/(|g| + eps/sqrt(1-β2)) ≈ lr·sign(g): elements 0 and 3 move the way
    # their weight points (u·p > 0), 1 and 2 against it, and 4 not at all (u·p = 0).
    weight, grad, lr, wd = [2.0, 1.0, 3.0, -4.0, 0.5], [1.0, -1.0, -2.0, -3.0, 0.0], 0.1, 0.5
    after = {}
    for decay in (0.0, wd):
        p = torch.nn.Parameter(torch.tensor(weight))
        p.grad = torch.tensor(grad)
        RecordAdam([p], lr=lr, weight_decay=decay, weight_decay_mode="cautious").step()
        after[decay] = p.detach()
    decayed = after[0.0] - after[wd]
    mask = torch.tensor([True, False, False, True, False])
    assert torch.equal(decayed[~mask], torch.zeros(3))
    torch.testing.assert_close(decayed[mask], lr * lr * wd * torch.tensor(weight)[mask])  # ∝ lr², not lr


def _groups(params):
    return [dict(params=params[:2], lr_mult=1.0, betas=(0.5, 0.95), weight_decay=0.75),
            dict(params=params[2:], lr_mult=10.0, betas=(0.9, 0.99), weight_decay=0.025)]


def test_state_round_trip_between_updates():
    # A bf16 parameter too: its moments and pending sum must come back fp32, not cast to bf16.
    dtypes = (torch.float32, torch.bfloat16, torch.float32)
    whole = _params(dtypes)
    _run(RecordAdam(_groups(whole), update_every=2, weight_decay_mode="cautious"), whole, range(6))

    first = _params(dtypes)
    opt = RecordAdam(_groups(first), update_every=2, weight_decay_mode="cautious")
    _run(opt, first, range(3))  # step 2 is not an update: its gradients are pending
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as speedrun.checkpoint loads it
    assert all("grad_sum" in entries for entries in saved["state"].values())

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = RecordAdam(_groups(resumed), update_every=2, weight_decay_mode="cautious")
    # As speedrun.checkpoint restores it: the groups from this run, only the per-parameter state saved.
    opt.load_state_dict({"state": saved["state"], "param_groups": opt.state_dict()["param_groups"]})
    assert opt.state[resumed[1]]["exp_avg"].dtype == torch.float32
    _run(opt, resumed, range(3, 6))
    for p, q in zip(resumed, whole):
        assert torch.equal(p, q)


def test_pending_sum_survives_grads_zeroed_in_place():
    after = []
    for set_to_none in (True, False):
        p = torch.nn.Parameter(_randn((5, 4), 0))
        opt = RecordAdam([p], lr=0.01, update_every=2)
        for step in range(4):
            g = _randn((5, 4), step + 1)
            p.grad = g if p.grad is None else p.grad.add_(g)  # as backward accumulates into .grad
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        after.append(p.detach())
    assert torch.equal(*after)


def test_parameters_without_grads():
    """Within a window a missing grad counts as zero; a window with no grad at all leaves the parameter,
    its moments and its update count alone; every parameter counts every step()."""
    seeds = [0, 1, 1, 3, 4]  # even_only and zeros_on_odd start equal
    every_step, even_only, zeros_on_odd, late, never = params = [torch.nn.Parameter(_randn((4, 3), i)) for i in seeds]
    start = [p.detach().clone() for p in params]
    opt = RecordAdam(params, lr=0.01, weight_decay=0.5, update_every=2, weight_decay_mode="cautious")
    for step in range(6):
        grads = {every_step: _randn((4, 3), 10 * step)}
        if step % 2 == 0:  # even steps only: never a grad on an update step
            grads[even_only] = grads[zeros_on_odd] = _randn((4, 3), 10 * step + 1)
        else:
            grads[zeros_on_odd] = torch.zeros(4, 3)
        if step >= 2:
            grads[late] = _randn((4, 3), 10 * step + 2)
        for p in params:
            p.grad = grads.get(p)
        opt.step()
        if step == 1:  # `late` had no grad in the first window
            assert torch.equal(late, start[3]) and opt.state[late]["updates"] == 0
            assert not opt.state[late]["exp_avg"].any()

    assert torch.equal(even_only, zeros_on_odd) and not torch.equal(even_only, start[1])
    assert torch.equal(never, start[4]) and opt.state[never]["updates"] == 0 and "grad_sum" not in opt.state[never]
    assert [opt.state[p]["steps"] for p in params] == [6] * 5
    assert [opt.state[p]["updates"] for p in params] == [3, 3, 3, 2, 0]

    # `late`'s first update is a first update (k = 1), the same as a fresh optimizer's.
    alone = torch.nn.Parameter(start[3].clone())
    fresh = RecordAdam([alone], lr=0.01, weight_decay=0.5, update_every=2, weight_decay_mode="cautious")
    for step in range(2, 6):
        alone.grad = _randn((4, 3), 10 * step + 2)
        fresh.step()
    assert torch.equal(late, alone)


@pytest.mark.parametrize("overrides,expected", [
    ([], torch.optim.AdamW),
    (["optim.weight_decay_mode=cautious", "optim.hidden_optimizer=normuon"], RecordAdam),
    (["optim.adam_update_every=2"], RecordAdam),
])
def test_build_picks_adamw_for_the_defaults(overrides, expected):
    cfg = load_config("tiny-2025", overrides=overrides).optim
    roles = {"embed": [torch.nn.Parameter(torch.zeros(8, 4))], "scalar": [torch.nn.Parameter(torch.zeros(3))]}
    opt = adam.build([g for g in param_groups(roles, cfg) if g["kind"] == "adam"], cfg, fused=True)
    assert type(opt) is expected
    assert (opt.defaults["fused"] if expected is torch.optim.AdamW else opt.compiled) is True
    if expected is RecordAdam:
        assert opt.update_every == cfg.adam_update_every
        assert opt.cautious == (cfg.weight_decay_mode == "cautious")
        assert opt.param_groups[0]["eps"] == cfg.adam_eps
