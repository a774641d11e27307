"""The 2026 record's head and loss pieces: the shifted softcap, multi-token and prefix-token terms
of LMHead's loss against explicit per-position sums, the prefix-token table against a brute-force
search (hand-made and real GPT-2 vocabularies), and the tied-then-untied head against a model whose
head and embedding are one parameter, followed by two parameters given its Adam state by hand."""

import pytest
import torch
import torch.nn.functional as F

from speedrun.config import load_config
from speedrun.data.tokenizer import EOT, _load_ranks, gpt2
from speedrun.loss import LMHead
from speedrun.optim.adam import RecordAdam
from speedrun.optim.tied import add_embedding_grad, copy_head_to_embedding, untie
from speedrun.prefix import gpt2_prefix_table, prefix_table

VOCAB, DIM, B, T = 50, 8, 2, 7


def head(**changes) -> LMHead:
    cfg = load_config("tiny-2025").model
    cfg.vocab_size, cfg.model_dim, cfg.tied_head = VOCAB, DIM, False
    cfg.logit_softcap, cfg.softcap_temperature = 23.0, 7.5
    for key, value in changes.items():
        setattr(cfg, key, value)
    h = LMHead(cfg, padded_vocab=64)
    torch.nn.init.normal_(h.weight, generator=torch.Generator().manual_seed(0))
    return h


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g, requires_grad=True)
    return x, torch.randint(0, VOCAB, (B, T), generator=g)


def reference_loss(logits, targets, future_weights, prefix_targets=None, prefix_weight=0.0):
    """The record's loss by a plain loop in float64: the per-position sum of the weighted
    cross-entropies that exist at that position, summed over all positions, over B·T."""
    log_p = logits.double().log_softmax(-1)
    total = 0.0
    for b in range(B):
        for t in range(T):
            for k, w in enumerate(future_weights):
                if t + k < T:
                    total = total - float(w) * log_p[b, t, targets[b, t + k]]
            if prefix_targets is not None and prefix_targets[b, t] >= 0:
                total = total - float(prefix_weight) * log_p[b, t, prefix_targets[b, t]]
    return total / (B * T)


# ---- softcap ----

@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])
def test_the_softcap_is_cap_times_sigmoid_of_the_shifted_logit_over_the_temperature(shift):
    h, (x, _) = head(softcap_shift=shift), data()
    u = (x @ h.weight.T)[..., :VOCAB]
    expected = 23.0 * torch.sigmoid((u.double() + shift) / 7.5)
    torch.testing.assert_close(h(x, None), expected.float())
    if shift == 0.0:  # no shift is the earlier formula to the bit
        assert torch.equal(h(x, None), (23.0 * torch.sigmoid(F.linear(x, h.weight) / 7.5))[..., :VOCAB])


# ---- multi-token and prefix terms ----

def test_the_plain_loss_is_exactly_the_mean_next_token_cross_entropy():
    h, (x, targets) = head(softcap_shift=5.0), data()
    logits = h(x, None)
    plain = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert torch.equal(h(x, None, targets), plain)
    assert torch.equal(h(x, None, targets, future_weights=[1.0, 0.0, 0.0]), plain)
    assert torch.equal(h(x, None, targets, future_weights=[2.0]), 2.0 * plain)


@pytest.mark.parametrize("weights", [[1.0, 0.5, 0.25], torch.tensor([1.0, 0.0, 0.25]), torch.tensor([0.7, 0.3])])
def test_future_weights_sum_per_position_cross_entropies_over_all_positions(weights):
    h, (x, targets) = head(), data()
    got = h(x, None, targets, future_weights=weights)
    expected = reference_loss(h(x, None), targets, weights)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), expected)


def test_future_weights_beyond_the_sequence_add_nothing():
    h, (x, targets) = head(), data()
    weights = [1.0, 0.5] + [0.0] * (T - 2) + [3.0, 4.0]  # k = T and T + 1 have no target anywhere
    torch.testing.assert_close(h(x, None, targets, future_weights=torch.tensor(weights)),
                               h(x, None, targets, future_weights=[1.0, 0.5]))


def test_the_prefix_term_sums_over_the_positions_with_a_prefix_target():
    h, (x, targets) = head(), data()
    prefix = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))
    prefix[0, 1] = prefix[1, 4] = prefix[1, 6] = -1
    weights = torch.tensor([1.0, 0.5])
    got = h(x, None, targets, future_weights=weights, prefix_targets=prefix, prefix_weight=torch.tensor([0.25]))
    expected = reference_loss(h(x, None), targets, weights, prefix, 0.25)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), expected)
    # excluded positions contribute nothing whatever their logits, and a float weight works too
    none = torch.full_like(prefix, -1)
    torch.testing.assert_close(h(x, None, targets, prefix_targets=none, prefix_weight=0.25), h(x, None, targets))


def test_the_gradient_is_that_of_the_explicit_sum():
    h, (x, targets) = head(), data()
    prefix = torch.where(targets % 3 == 0, -1, targets // 2)
    weights = torch.tensor([1.0, 0.5, 0.25])
    h(x, None, targets, future_weights=weights, prefix_targets=prefix, prefix_weight=0.3).backward()
    got = x.grad.clone()
    x.grad = None
    reference_loss(h(x, None), targets, weights, prefix, 0.3).backward()
    torch.testing.assert_close(got, x.grad)


def test_tensor_weights_change_without_a_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    h, (x, targets) = head(), data()
    counter = CompileCounter()
    loss = torch.compile(h, backend=counter, fullgraph=True)
    prefix = targets.clone()
    for step in range(3):
        weights, w_p = torch.tensor([1.0, 0.5 - 0.2 * step]), torch.tensor([0.25 - 0.1 * step])
        torch.testing.assert_close(loss(x, None, targets, weights, prefix, w_p),
                                   h(x, None, targets, weights, prefix, w_p))
    assert counter.frame_count == 1


def test_a_loss_without_a_term_or_with_half_a_prefix_term_is_refused():
    h, (x, targets) = head(), data()
    with pytest.raises(ValueError, match="no loss"):
        h(x, None, targets, future_weights=[0.0])
    with pytest.raises(ValueError, match="together"):
        h(x, None, targets, prefix_targets=targets)
    with pytest.raises(ValueError, match="together"):
        h(x, None, targets, prefix_weight=0.5)


# ---- prefix table ----

def brute_force_prefixes(ranks: dict[bytes, int], vocab_size: int) -> list[int]:
    """Every token against every other: the longest one that is a proper prefix, else -1."""
    table = [-1] * vocab_size
    for token, i in ranks.items():
        prefixes = [p for p in ranks if len(p) < len(token) and token.startswith(p)]
        if prefixes:
            table[i] = ranks[max(prefixes, key=len)]
    return table


HAND_VOCAB = {b"a": 0, b"b": 1, b"ab": 2, b"abc": 3, b"abcd": 4, b"abd": 5, b"ba": 6, b"x": 7, b"xyz": 8,
              b"xyzab": 9, b"\xe2\x80": 10, b"\xe2\x80\x99": 11}


def test_prefix_table_of_a_hand_made_vocabulary():
    table = prefix_table(HAND_VOCAB, 14)
    assert table.dtype == torch.int64
    # xyz: "xy" is no token, so "x"; xyzab: "xyza" and "xyzab"[:4] are not, "xyz" is
    assert table.tolist() == [-1, -1, 0, 2, 3, 2, 1, -1, 7, 8, -1, 10, -1, -1]
    assert table.tolist() == brute_force_prefixes(HAND_VOCAB, 14)


def test_tokens_past_the_vocabulary_size_neither_map_nor_serve_as_prefixes():
    table = prefix_table(HAND_VOCAB, 4)  # ids 0..3 only
    assert table.tolist() == [-1, -1, 0, 2]
    without_abc = {t: i for t, i in HAND_VOCAB.items() if t != b"abc"}
    with_abc_beyond = {**without_abc, b"abc": 20}
    assert prefix_table(with_abc_beyond, 12)[4] == 2  # abcd -> ab, as if abc were not a token


def test_ids_shared_or_negative_are_refused():
    with pytest.raises(ValueError, match="own non-negative id"):
        prefix_table({b"a": 0, b"b": 0}, 4)
    with pytest.raises(ValueError, match="own non-negative id"):
        prefix_table({b"a": -1}, 4)


def test_the_gpt2_prefix_table_by_bytes():
    ranks = _load_ranks()
    table = gpt2_prefix_table(50304)
    assert table.shape == (50304,)
    spelled = {i: token for token, i in ranks.items()}
    enc = gpt2()
    samples = [t for word in (" there", " understanding", "hello", " Hello", "ing", " 2026") for t in enc.encode(word)]
    assert len(samples) >= 6
    for i in samples:
        prefixes = [p for p in ranks if len(p) < len(spelled[i]) and spelled[i].startswith(p)]
        assert spelled[int(table[i])] == max(prefixes, key=len)
    assert spelled[int(table[enc.encode(" there")[0]])] == b" ther"
    single_bytes = [i for i, token in spelled.items() if len(token) == 1]
    assert len(single_bytes) == 256 and (table[single_bytes] == -1).all()
    assert table[EOT] == -1 and (table[50257:] == -1).all()
    for i in range(50256):  # every mapped token's prefix is a strictly shorter prefix of its bytes
        if table[i] >= 0:
            p = spelled[int(table[i])]
            assert len(p) < len(spelled[i]) and spelled[i].startswith(p)
    assert (table[:50256] >= 0).sum() == 50256 - 256  # every token of 2+ bytes extends some token


# ---- tied-then-untied head ----

V, D, N = 12, 4, 10
TIED_STEPS, TOTAL_STEPS = 4, 8


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)


def loss_of(embed, head_weight, step):
    idx, targets = batch(step)
    return F.cross_entropy(F.linear(F.embedding(idx, embed), head_weight), targets)


def make_optimizer(kind, head_param, embed_param, same_group):
    if same_group:
        groups = [dict(params=[head_param, embed_param], lr=0.05)]
    else:
        groups = [dict(params=[head_param], lr=0.05), dict(params=[embed_param], lr=0.02)]
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.5, 0.95), eps=1e-8, weight_decay=0.1)
    return RecordAdam(groups, betas=(0.5, 0.95), eps=1e-10, weight_decay=0.1, update_every=2,
                      weight_decay_mode="cautious")


def train_tied_then_untied(kind, same_group, untie_after):
    torch.manual_seed(0)
    head_p = torch.nn.Parameter(torch.randn(V, D))
    embed_p = torch.nn.Parameter(head_p.detach().clone())
    opt = make_optimizer(kind, head_p, embed_p, same_group)
    for step in range(TOTAL_STEPS):
        loss_of(embed_p, head_p, step).backward()
        tied = step <= untie_after
        if tied:
            add_embedding_grad(head_p, embed_p)
            assert embed_p.grad is None
        opt.step()
        if tied:
            copy_head_to_embedding(head_p, embed_p)
            assert not opt.state[embed_p].get("exp_avg", torch.zeros(1)).any()  # untouched while tied
        if step == untie_after:
            untie(opt, head_p, embed_p)
        opt.zero_grad()
    return head_p.detach(), embed_p.detach()


def train_reference(kind, same_group, untie_after):
    """One shared parameter while tied; then two parameters, each given the shared one's state
    key by key, in a fresh optimizer of the same groups."""
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(V, D))
    unused = torch.nn.Parameter(torch.zeros(V, D))  # the embedding's place in the groups
    opt = make_optimizer(kind, shared, unused, same_group)
    for step in range(untie_after + 1):
        loss_of(shared, shared, step).backward()
        opt.step()
        opt.zero_grad()
    head_p = torch.nn.Parameter(shared.detach().clone())
    embed_p = torch.nn.Parameter(shared.detach().clone())
    untied = make_optimizer(kind, head_p, embed_p, same_group)
    keys = ["step", "exp_avg", "exp_avg_sq"] if kind == "adamw" else ["steps", "updates", "exp_avg", "exp_avg_sq"]
    if "grad_sum" in opt.state[shared]:
        keys.append("grad_sum")
    assert sorted(keys) == sorted(opt.state[shared])
    for p in (head_p, embed_p):
        for key in keys:
            value = opt.state[shared][key]
            untied.state[p][key] = value.clone() if isinstance(value, torch.Tensor) else value
    for step in range(untie_after + 1, TOTAL_STEPS):
        loss_of(embed_p, head_p, step).backward()
        untied.step()
        untied.zero_grad()
    return head_p.detach(), embed_p.detach()


@pytest.mark.parametrize("kind,same_group,untie_after", [
    ("adamw", True, 3), ("adamw", False, 3),
    ("record", True, 3), ("record", False, 3),  # untie right after an update step
    ("record", False, 2),  # mid-window: the pending gradient sum goes along
])
def test_tied_then_untied_equals_one_shared_parameter_then_two_with_its_state(kind, same_group, untie_after):
    head_got, embed_got = train_tied_then_untied(kind, same_group, untie_after)
    head_ref, embed_ref = train_reference(kind, same_group, untie_after)
    torch.testing.assert_close(head_got, head_ref)
    torch.testing.assert_close(embed_got, embed_ref)
    assert not torch.allclose(head_got, embed_got)  # they did train apart


def test_untie_refuses_parameters_the_optimizer_lacks_or_that_differ():
    a, b, c = (torch.nn.Parameter(torch.randn(V, D)) for _ in range(3))
    opt = torch.optim.AdamW([a, b])
    with pytest.raises(ValueError, match="does not hold the embedding"):
        untie(opt, a, c)
    with pytest.raises(ValueError, match="one shape"):
        untie(opt, a, torch.nn.Parameter(torch.randn(V, D + 1)))
    with pytest.raises(ValueError, match="one shape"):
        add_embedding_grad(a, a)
