"""The 2026 record's input side (speedrun.embed): the smear gate, the bigram hash and its signs, and
per-layer value embeddings, each against a plain-Python loop of its formula; their inits, role tags
and meta-device builds; and a KV-cache continuation agreeing with the full sequence."""

import pytest
import torch

from speedrun.config import ModelConfig
from speedrun.data.tokenizer import EOT
from speedrun.embed import BigramEmbedding, LayerValueEmbeddings, SmearGate, bigram_ids, bigram_sign_ids, bigram_signs

RECORD_ROWS = 50304 * 15 // 2  # 377,280


def cfg(**changes) -> ModelConfig:
    base = dict(vocab_size=EOT + 1, model_dim=16, bigram_vocab=97, bigram_sign_rows=8,
                value_embed_layers=[1, 3], value_embed_std=0.01)
    return ModelConfig(**{**base, **changes})


def tokens(B=2, T=12, seed=0) -> torch.Tensor:
    """Random GPT-2 token ids with both extremes (0 and EOT = 50256) in every row."""
    idx = torch.randint(0, EOT + 1, (B, T), generator=torch.Generator().manual_seed(seed))
    idx[:, 2], idx[:, 3], idx[:, 5] = 0, EOT, EOT
    return idx


def randomised_smear(seed=0) -> SmearGate:
    gate = SmearGate(cfg())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(1, 12, generator=g))
        gate.strength.fill_(0.7)
    return gate


def smear_reference(e, w, lam, prev=None):
    """e_t + λ·σ(Σ_i w_i e_t[i])·e_(t-1), one position at a time, in float64."""
    e, w = e.double(), w.double().flatten()
    out = e.clone()
    for b in range(e.size(0)):
        for t in range(e.size(1)):
            before = e[b, t - 1] if t > 0 else (None if prev is None else prev[b, 0].double())
            if before is not None:
                gate = lam * torch.sigmoid(sum(w[i] * e[b, t, i] for i in range(12)))
                out[b, t] = e[b, t] + gate * before
    return out


def hash_reference(pairs_of, rows):
    """Pure-Python ints: ((36313·x_t) ^ (27191·x_(t-1))) % (rows - 1), rows - 1 with no previous token."""
    return [[rows - 1 if p is None else ((36313 * x) ^ (27191 * p)) % (rows - 1) for p, x in row] for row in pairs_of]


def pairs(idx, prev=None):
    """(previous or None, current) of each position, as Python ints."""
    out = []
    for b, row in enumerate(idx.tolist()):
        before = [None if prev is None else prev[b, 0].item()] + row[:-1]
        out.append(list(zip(before, row)))
    return out


# --- smear gate (E1) ---

def test_smear_matches_the_formula_position_by_position():
    gate = randomised_smear()
    e = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    expected = smear_reference(e, gate.weight.detach(), 0.7)
    got = gate(e)
    assert torch.equal(got[:, 0], e[:, 0])  # position 0 has nothing before it
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_smear_with_prev_smears_position_zero_from_it():
    gate = randomised_smear(seed=2)
    g = torch.Generator().manual_seed(3)
    e, prev = torch.randn(2, 5, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    expected = smear_reference(e, gate.weight.detach(), 0.7, prev)
    got = gate(e, prev)
    assert not torch.allclose(got[:, 0], e[:, 0])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_smear_continuation_equals_the_tail_of_the_full_sequence():
    gate = randomised_smear(seed=4)
    e = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))
    full = gate(e)
    for k in (1, 4, 8):
        torch.testing.assert_close(gate(e[:, k:], e[:, k - 1:k]), full[:, k:], rtol=0, atol=1e-7)


def test_fresh_smear_gate_starts_closed_and_returns_e_bit_for_bit():
    gate = SmearGate(cfg())
    assert torch.equal(gate.weight, torch.zeros(1, 12)) and gate.strength.item() == 0.0
    e = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(6)) * 1e3
    assert torch.equal(gate(e), e)
    assert torch.equal(gate(e, torch.randn(2, 1, 16)), e)
    with torch.no_grad():  # an open-looking gate w but λ = 0 still adds nothing
        gate.weight.fill_(5.0)
    assert torch.equal(gate(e), e)


def test_smear_runs_in_bf16_close_to_fp32():
    gate = randomised_smear(seed=7)
    e = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(8))
    got = gate(e.bfloat16())
    assert got.dtype == torch.bfloat16 and gate.weight.dtype == torch.float32
    torch.testing.assert_close(got.float(), gate(e), rtol=0.02, atol=0.02)


# --- bigram hash (E2) ---

@pytest.mark.parametrize("rows", [RECORD_ROWS, 97])
def test_bigram_ids_match_a_python_loop(rows):
    idx = tokens()
    expected = hash_reference(pairs(idx), rows)
    assert bigram_ids(idx, None, rows).tolist() == expected
    assert bigram_ids(idx, None, rows).dtype == torch.int64
    prev = torch.tensor([[EOT], [0]])
    assert bigram_ids(idx, prev, rows).tolist() == hash_reference(pairs(idx, prev), rows)


def test_bigram_ids_take_int32_token_tensors():
    idx = tokens()
    assert torch.equal(bigram_ids(idx.int(), None, RECORD_ROWS), bigram_ids(idx, None, RECORD_ROWS))


def int32_hash(current: torch.Tensor, previous: torch.Tensor, rows: int) -> torch.Tensor:
    """The record's arithmetic: int32 products (wrapping on overflow), XOR, mod."""
    current, previous = current.int(), previous.int()
    return torch.bitwise_xor(36313 * current, 27191 * previous) % (rows - 1)


def test_bigram_ids_equal_int32_arithmetic_over_the_whole_gpt2_range():
    assert 36313 * EOT < 2 ** 31 and 27191 * EOT < 2 ** 31  # so no product of two token ids overflows
    every = torch.arange(EOT + 1)
    edges = [0, 1, 255, 40000, EOT - 1, EOT]
    for edge in edges:  # each edge token before, and after, every token id
        fixed = torch.full_like(every, edge)
        for before, current in ((fixed, every), (every, fixed)):
            idx = torch.stack([before, current], dim=1)  # (V, 2): position 1 hashes (before, current)
            expected = int32_hash(current, before, RECORD_ROWS).long()
            assert torch.equal(bigram_ids(idx, None, RECORD_ROWS)[:, 1], expected)


def test_int32_arithmetic_diverges_past_the_documented_token_bound():
    # the check above can fail: ids above 2^31 / 36313 overflow int32, and int64 keeps the true product
    idx = torch.tensor([[3, 60000]])
    assert bigram_ids(idx, None, RECORD_ROWS)[0, 1] != int32_hash(idx[:, 1], idx[:, 0], RECORD_ROWS)[0]


def test_bigram_sign_ids_match_a_python_loop():
    idx = tokens(seed=9)
    expected = [[0 if p is None else (p ^ x) % 8 for p, x in row] for row in pairs(idx)]
    assert bigram_sign_ids(idx, None, 8).tolist() == expected
    prev = torch.tensor([[7], [EOT]])
    expected = [[(p ^ x) % 5 for p, x in row] for row in pairs(idx, prev)]
    assert bigram_sign_ids(idx, prev, 5).tolist() == expected


def test_hash_rejects_tables_too_small_to_hash_into():
    with pytest.raises(ValueError, match="at least 2 rows"):
        bigram_ids(tokens(), None, 1)
    with pytest.raises(ValueError, match="at least 1 row"):
        bigram_sign_ids(tokens(), None, 0)


def randomised_bigram(**changes) -> BigramEmbedding:
    bigram = BigramEmbedding(cfg(**changes))
    with torch.no_grad():
        bigram.table.weight.copy_(torch.randn(bigram.table.weight.shape, generator=torch.Generator().manual_seed(10)))
    return bigram


@pytest.mark.parametrize("prev", [None, torch.tensor([[EOT], [11]])])
def test_bigram_forward_is_the_table_row_times_the_sign_row(prev):
    bigram = randomised_bigram()
    idx = tokens(seed=11)
    table, signs = bigram.table.weight.detach(), bigram_signs(8, 16)
    got = bigram(idx, prev)
    for b, row in enumerate(pairs(idx, prev)):
        for t, (p, x) in enumerate(row):
            h = 96 if p is None else ((36313 * x) ^ (27191 * p)) % 96
            s = 0 if p is None else (p ^ x) % 8
            assert torch.equal(got[b, t], table[h] * signs[s])


def test_bigram_without_signs_is_the_table_row():
    bigram = randomised_bigram(bigram_sign_rows=0)
    assert bigram.signs is None
    idx = tokens(seed=12)
    rows = torch.tensor(hash_reference(pairs(idx), 97))
    assert torch.equal(bigram(idx), bigram.table.weight.detach()[rows])


def test_bigram_continuation_equals_the_tail_of_the_full_sequence():
    bigram = randomised_bigram()
    idx = tokens(T=10, seed=13)
    full = bigram(idx)
    for k in (1, 5, 9):
        assert torch.equal(bigram(idx[:, k:], idx[:, k - 1:k]), full[:, k:])


def test_fresh_bigram_table_is_zero_so_its_output_is_zero():
    bigram = BigramEmbedding(cfg())
    assert torch.equal(bigram(tokens()), torch.zeros(2, 12, 16))


def test_signs_are_plus_minus_one_fixed_and_independent_of_the_global_seed():
    torch.manual_seed(0)
    first = BigramEmbedding(cfg(bigram_sign_rows=64)).signs
    torch.manual_seed(12345)
    torch.randn(1000)
    second = BigramEmbedding(cfg(bigram_sign_rows=64)).signs
    assert torch.equal(first, second)
    assert set(first.unique().tolist()) == {-1.0, 1.0}
    assert 0.35 < (first > 0).float().mean().item() < 0.65
    # pinned: the signs pair with checkpointed tables, so a change in torch's CPU generator must show
    assert first[0].int().tolist() == [1, 1, 1, 1, 1, 1, -1, 1, 1, 1, -1, -1, 1, 1, -1, 1]
    assert first[63].int().tolist() == [-1, 1, -1, 1, -1, 1, 1, 1, -1, -1, 1, 1, 1, -1, 1, 1]
    assert int(first.sum()) == 40


def test_signs_stay_out_of_the_state_dict():
    bigram = BigramEmbedding(cfg())
    assert list(bigram.state_dict()) == ["table.weight"]
    fresh = BigramEmbedding(cfg())
    fresh.load_state_dict(bigram.state_dict())  # strict: nothing missing
    assert torch.equal(fresh.signs, bigram.signs)


# --- value embeddings (E3) ---

def test_value_tables_have_the_configured_std_and_are_independent():
    values = LayerValueEmbeddings(cfg(vocab_size=4096, model_dim=64, value_embed_std=0.03))
    one, three = values.tables["1"].weight.detach(), values.tables["3"].weight.detach()
    for w in (one, three):
        assert w.shape == (4096, 64)
        assert abs(w.std().item() / 0.03 - 1) < 0.01 and abs(w.mean().item()) < 1e-3
    assert not torch.equal(one, three)


def test_value_embeddings_return_each_layers_rows():
    values = LayerValueEmbeddings(cfg())
    idx = tokens(seed=14)
    out = values(idx)
    assert sorted(out) == [1, 3]
    for layer, table in ((1, values.tables["1"]), (3, values.tables["3"])):
        assert torch.equal(out[layer], torch.stack([table.weight.detach()[row] for row in idx]))


def test_no_value_layers_build_an_empty_module():
    values = LayerValueEmbeddings(cfg(value_embed_layers=[]))
    assert values(tokens()) == {} and not list(values.parameters())


# --- roles and meta-device builds ---

def roles(module):
    return {name: getattr(p, "role", None) for name, p in module.named_parameters()}


def test_every_parameter_carries_its_role():
    assert roles(SmearGate(cfg())) == {"weight": "smear", "strength": "scalar"}
    assert roles(BigramEmbedding(cfg())) == {"table.weight": "value_embed"}
    assert roles(LayerValueEmbeddings(cfg())) == {"tables.1.weight": "value_embed", "tables.3.weight": "value_embed"}


def test_meta_built_modules_get_the_documented_init_after_to_empty():
    c = cfg(vocab_size=4096, model_dim=64, value_embed_std=0.02)
    with torch.device("meta"):
        smear, bigram, values = SmearGate(c), BigramEmbedding(c), LayerValueEmbeddings(c)
    for module in (smear, bigram, values):
        module.to_empty(device="cpu")
        module.reset_parameters()
    assert not smear.weight.any() and smear.strength.item() == 0.0
    assert not bigram.table.weight.any()
    assert torch.equal(bigram.signs, bigram_signs(8, 64))
    for table in values.tables.values():
        assert abs(table.weight.std().item() / 0.02 - 1) < 0.01
    assert roles(smear) == {"weight": "smear", "strength": "scalar"}  # to_empty drops tags; reset restores them
    assert set(roles(bigram).values()) == set(roles(values).values()) == {"value_embed"}
