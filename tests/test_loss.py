"""The loss tail (speedrun/loss.py): the head's logits, softcap and vocabulary crop against a plain
matmul, and the several-targets form against explicit sums."""

import pytest
import torch
import torch.nn.functional as F

from speedrun.config import load_config
from speedrun.loss import LMHead
from speedrun.model import GPT

VOCAB, DIM, B, T = 300, 16, 2, 24


def head(**changes) -> LMHead:
    cfg = load_config("tiny-2025").model
    cfg.vocab_size, cfg.model_dim = VOCAB, DIM
    for key, value in changes.items():
        setattr(cfg, key, value)
    h = LMHead(cfg, padded_vocab=384)
    if h.weight is not None:
        torch.nn.init.normal_(h.weight, generator=torch.Generator().manual_seed(0))
    return h


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIM, generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def test_logits_are_the_softcapped_matmul_over_the_vocabulary_columns():
    h, (x, _) = head(), data()
    u = x @ h.weight.T
    assert u.shape[-1] == 384
    expected = 30.0 * torch.sigmoid(u[..., :VOCAB] / 7.5)
    torch.testing.assert_close(h(x, None), expected)
    plain = head(logit_softcap=0.0)
    torch.testing.assert_close(plain(x, None), u[..., :VOCAB])


def test_a_tied_head_uses_the_weight_it_is_given():
    h, (x, _) = head(tied_head=True, zero_init_head=False), data()
    assert h.weight is None and not list(h.parameters())
    w = torch.randn(384, DIM)
    torch.testing.assert_close(h(x, w), 30.0 * torch.sigmoid((x @ w.T)[..., :VOCAB] / 7.5))


def test_the_default_loss_is_the_next_token_cross_entropy():
    h, (x, targets) = head(), data()
    logits = h(x, None)
    assert torch.equal(h(x, None, targets), F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))


def loss_and_grads(h, x, weight, targets, **terms):
    x = x.detach().clone().requires_grad_()
    loss = h(x, weight, targets, **terms)
    loss.backward()
    w = h.weight if weight is None else weight
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("changes", [{}, dict(logit_softcap=0.0), dict(logit_softcap=23.0, softcap_shift=5.0),
                                     dict(logit_softcap=80.0), dict(tied_head=True, zero_init_head=False)],
                         ids=["softcap", "no-softcap", "shifted", "cap-above-bounded", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_matches_the_autograd_one(changes, dtype):
    """CPU training's loss by row chunks (chunk_rows, 5 rows: 48 positions leave a partial chunk)
    gives the loss and the gradients of x and the weight that autograd gives through the plain
    tail, the padding rows' weight gradient zero; the loss's weight reaches both."""
    x, targets = data()
    x = x.to(dtype)
    results = []
    for chunk_rows in (0, 5):
        h = head(**changes)
        h.chunk_rows = chunk_rows
        weight = torch.randn(384, DIM, generator=torch.Generator().manual_seed(1)).requires_grad_() \
            if h.weight is None else None
        results.append(loss_and_grads(h, x, weight, targets, future_weights=(0.5,)))
    (loss, grad_x, grad_w), (chunked_loss, chunked_x, chunked_w) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=2e-4)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-5)
    assert chunked_x.dtype == dtype and chunked_w.dtype == torch.float32
    torch.testing.assert_close(chunked_x, grad_x, **tol)
    torch.testing.assert_close(chunked_w, grad_w, **tol)
    assert not chunked_w[VOCAB:].any()


def test_the_chunked_loss_compiles_once_for_every_batch_size():
    """The chunks' kernel takes the mean's 1/rows as a tensor: a stage with another batch size (and
    the same chunk shape) runs the graph the first compiled, with that batch's own scale."""
    from conftest import Compiles

    h = head()
    h.chunk_rows = 8
    x, targets = data()
    loss_and_grads(h, x, None, targets)
    with Compiles() as compiled:
        one = loss_and_grads(h, x[:1], None, targets[:1])
    assert not compiled.frames, compiled.frames
    h.chunk_rows = 0
    reference = loss_and_grads(h, x[:1], None, targets[:1])
    for got, want in zip(one, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_chunked_loss_is_only_for_a_plain_next_token_loss_in_training():
    """Evaluation and multi-token terms take the plain tail, which keeps the logits: those calls
    never reach the chunked function, whose result needs no logits."""
    def chunked(loss) -> bool:  # the loss's last two autograd nodes: the loss weight's product, and below it
        nodes = [loss.grad_fn, *(fn for fn, _ in loss.grad_fn.next_functions)]
        return any("ChunkedCrossEntropy" in type(fn).__name__ for fn in nodes)

    h, (x, targets) = head(), data()
    h.chunk_rows = 5
    assert chunked(h(x, None, targets))
    assert not chunked(h(x, None, targets, future_weights=(1.0, 0.5)))
    h.eval()
    assert not chunked(h(x, None, targets))


def test_future_weights_sum_the_losses_against_later_tokens():
    """Multi-token prediction's form, as the record's loss kernel: each position's loss is
    sum_k w_k * CE(logits[t], targets[t + k]) over the k whose target is in the sequence, and the
    loss is their sum over all B·T positions divided by B·T."""
    h, (x, targets) = head(), data()
    logits = h(x, None)
    log_p = logits.log_softmax(-1)
    expected = 0.0
    for k, w in enumerate([1.0, 0.5, 0.25]):
        picked = [log_p[b, t, targets[b, t + k]] for b in range(B) for t in range(T - k)]
        expected += w * -torch.stack(picked).sum() / (B * T)
    got = h(x, None, targets, future_weights=[1.0, 0.5, 0.25])
    torch.testing.assert_close(got, expected)
    assert h(x, None, targets, future_weights=[1.0, 0.0]) == h(x, None, targets)


@pytest.mark.parametrize("preset", ["tiny-2025", "baseline-tiny"])
def test_every_parameter_has_one_role_by_what_holds_it(preset):
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = GPT(cfg)
    roles = model.param_groups()
    by_id = {id(p): role for role, params in roles.items() for p in params}
    assert len(by_id) == sum(len(v) for v in roles.values()) == len(list(model.parameters()))
    assert {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} == \
        {id(p) for p in roles["embed"]}
    assert roles.get("head", []) == ([] if cfg.tied_head else [model.lm_head.weight])
    assert all(p.ndim < 2 for p in roles["scalar"]) and all(p.ndim >= 2 for p in roles["hidden"])
    # a module added later finds its group without a change to param_groups
    model.bigram = torch.nn.Embedding(10, cfg.model_dim, device="meta")
    model.gate = torch.nn.Parameter(torch.zeros(3, device="meta"))
    roles = model.param_groups()
    assert any(p is model.bigram.weight for p in roles["embed"]) and any(p is model.gate for p in roles["scalar"])
