"""The 2026 record's attention pieces (speedrun.rotary, and the varlen window, paired heads, key
offset, XSA and composable attention of speedrun.attention), each against a reference written
here: explicit complex rotations, float64 formulas, predicates looped over dense grids, and a
slow per-row construction of paired-head attention."""

import cmath
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from speedrun import attention
from speedrun.attention import (NO_WINDOW, VARLEN, attend, build_masks, composable_attention, document_ids,
                                farthest_key, flex_masks, key_offset, mask_rule, window_rule_block, xsa)
from speedrun.config import ModelConfig
from speedrun.data.tokenizer import EOT
from speedrun.model import position_qk
from speedrun.rotary import (apply_rotary, base_frequencies, from_pair_rows, paired_tables, rotary_tables,
                             rotary_tables_from, rotate_paired, to_pair_rows, yarn_scale, yarn_state, yarn_update)


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def tokens_with_bos(batch: int, seq_len: int, bos: list[list[int]]) -> torch.Tensor:
    idx = torch.randint(0, EOT, (batch, seq_len), generator=torch.Generator().manual_seed(3))
    for b, positions in enumerate(bos):
        idx[b, positions] = EOT
    return idx


def looped_documents(idx: torch.Tensor) -> list[list[int]]:
    """Per row, each token's document: the count of BOS tokens up to and including it."""
    docs = []
    for row in idx.tolist():
        count, ids = 0, []
        for token in row:
            count += token == EOT
            ids.append(count)
        docs.append(ids)
    return docs


# ---------------------------------------------------------------- rotary


def old_model_rotary(seq_len: int, head_dim: int, base: float, truncate: bool, x: torch.Tensor) -> torch.Tensor:
    """speedrun.model's rotary before the move to speedrun.rotary, verbatim in effect."""
    half = head_dim // 2
    if truncate:
        freq = (1.0 / base) ** torch.linspace(0, 1, half // 2)
        freq = torch.cat([freq, freq.new_zeros(half - half // 2)])
    else:
        freq = (1.0 / base) ** (torch.arange(half) / half)
    theta = torch.outer(torch.arange(seq_len, dtype=torch.float32), freq)
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_halves_rotary_is_unchanged(truncate, dtype):
    cfg = ModelConfig(head_dim=16, rotary_base=1024.0, rotary_half_truncate=truncate)
    x = randn(2, 40, 3, 16, dtype=dtype)
    cos, sin = rotary_tables(40, cfg, "cpu")
    assert cos.shape == sin.shape == (40, 8)
    assert torch.equal(apply_rotary(x, cos, sin), old_model_rotary(40, 16, 1024.0, truncate, x))
    assert torch.equal(apply_rotary(x, cos, sin, "halves"), apply_rotary(x, cos, sin))


def frequencies(head_dim: int) -> torch.Tensor:
    return base_frequencies(ModelConfig(head_dim=head_dim, rotary_base=1024.0), "cpu")


def test_base_frequencies():
    freq = frequencies(128).double()
    assert freq.shape == (64,)
    expected = [1024.0 ** (-i / 31) for i in range(32)]  # the record's ω_i = 1024^(-i/31) on 32 pairs
    torch.testing.assert_close(freq[:32], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.all(freq[32:] == 0)
    full = base_frequencies(ModelConfig(head_dim=128, rotary_base=1024.0, rotary_half_truncate=False), "cpu").double()
    torch.testing.assert_close(full, torch.tensor([1024.0 ** (-i / 64) for i in range(64)], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def complex_rotation(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor, pairs: str) -> torch.Tensor:
    """Reference: (B, T, H, D) x with positions (T,) or (T, H); pair i as the complex number
    a + ib, multiplied by e^(-i·position·freq_i), in float64, one element at a time."""
    B, T, H, D = x.shape
    out = x.double().clone()
    for b in range(B):
        for t in range(T):
            for h in range(H):
                pos = float(positions[t] if positions.dim() == 1 else positions[t, h])
                for i in range(D // 2):
                    ia, ib = (i, i + D // 2) if pairs == "halves" else (2 * i, 2 * i + 1)
                    z = complex(x[b, t, h, ia], x[b, t, h, ib]) * cmath.exp(-1j * pos * float(freq[i]))
                    out[b, t, h, ia], out[b, t, h, ib] = z.real, z.imag
    return out


@pytest.mark.parametrize("pairs", ["adjacent", "halves"])
def test_rotation_against_complex_numbers(pairs):
    freq = yarn_update(frequencies(16), 128, 384)  # a stretched vector works the same
    x = randn(1, 12, 2, 16, seed=1)
    positions = torch.arange(12) * 3 + 5
    cos, sin = rotary_tables_from(freq, positions)
    out = apply_rotary(x, cos, sin, pairs)
    torch.testing.assert_close(out.double(), complex_rotation(x, positions, freq, pairs), atol=2e-5, rtol=0)
    from_zero = apply_rotary(x, *rotary_tables_from(freq, 12), pairs)  # an int n: positions 0 .. n-1
    torch.testing.assert_close(from_zero.double(), complex_rotation(x, torch.arange(12), freq, pairs), atol=2e-5, rtol=0)


def test_adjacent_rotation_keeps_norms_and_leaves_the_second_half():
    x = randn(2, 30, 3, 16, seed=2)
    cos, sin = rotary_tables_from(frequencies(16), torch.arange(30))
    out = apply_rotary(x, cos, sin, "adjacent")
    assert torch.equal(out[..., 8:], x[..., 8:])  # dims D/2.. are the position-free half
    assert not torch.allclose(out[:, 1:, :, :8], x[:, 1:, :, :8])
    pair_norms = lambda y: y.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(pair_norms(out), pair_norms(x), atol=1e-5, rtol=1e-5)
    halves = apply_rotary(x, cos, sin, "halves")
    torch.testing.assert_close(halves.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(halves[..., 4:8], x[..., 4:8]) and torch.equal(halves[..., 12:], x[..., 12:])


def test_unknown_pairing_is_refused():
    cos, sin = rotary_tables_from(frequencies(8), torch.arange(4))
    with pytest.raises(ValueError, match="unknown rotary pairing 'interleaved'"):
        apply_rotary(randn(1, 4, 1, 8), cos, sin, "interleaved")


@pytest.mark.parametrize("pairs", ["adjacent", "halves"])
def test_paired_rotation_puts_head_h_at_2t_plus_h_mod_2(pairs):
    freq = frequencies(16)
    x = randn(2, 5, 6, 16, seed=3)
    past = 3  # a KV cache's offset: tokens 3 .. 7
    cos, sin = paired_tables(freq, past, 5)
    assert cos.shape == sin.shape == (5, 2, 8)
    positions = torch.tensor([[2 * (past + t) + h % 2 for h in range(6)] for t in range(5)])
    torch.testing.assert_close(rotate_paired(x, (cos, sin), pairs).double(), complex_rotation(x, positions, freq, pairs),
                               atol=2e-5, rtol=0)


def qk_and_tables(paired: bool, dtype, H: int = 4, T: int = 6):
    q, k = randn(2, T, H, 16, seed=1, dtype=dtype), randn(2, T, H, 16, seed=2, dtype=dtype)
    tables = paired_tables(frequencies(16), 0, T) if paired else rotary_tables_from(frequencies(16), T)
    return q, k, tables


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("pairs", ["adjacent", "halves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_normed_and_rotated_side_by_side_as_each_alone(paired, pairs, dtype):
    """Attention norms and rotates q and k as one (B, T, 2H, D) tensor (model.position_qk), one call
    that a compiled run fuses: bit for bit what each gets alone."""
    q, k, tables = qk_and_tables(paired, dtype)
    rotate = (lambda x: rotate_paired(x, tables, pairs)) if paired else (lambda x: apply_rotary(x, *tables, pairs))
    qk = torch.cat([q, k], dim=2)
    assert torch.equal(position_qk(qk, tables, True, paired, pairs),
                       torch.cat([rotate(F.rms_norm(x, (16,))) for x in (q, k)], dim=2))
    assert torch.equal(position_qk(qk, None, True, paired, pairs), F.rms_norm(qk, (16,)))


def test_q_and_k_compiled_as_one_region_within_a_rounding():
    """Compiled (a CPU run's regions, with tiny's pairing and dtype), the float32 rotation no longer
    rounds the normed q and k to bf16 first: within a rounding of the eager result."""
    q, k, tables = qk_and_tables(False, torch.bfloat16)
    qk = torch.cat([q, k], dim=2)
    compiled = torch.compile(position_qk, dynamic=False)(qk, tables, True, False, "adjacent")
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(compiled, position_qk(qk, tables, True, False, "adjacent"), atol=4 * eps, rtol=2 * eps)


# ---------------------------------------------------------------- YaRN


def yarn_reference(freq: list[float], old: int, new: int, alpha: float = 1, beta: float = 32) -> list[float]:
    out = []
    for w in freq:
        r = old * w / (2 * math.pi)
        gamma = min(max((r - alpha) / (beta - alpha), 0.0), 1.0)
        out.append(w * (old / new + gamma * (1 - old / new)))
    return out


def test_yarn_update_against_the_formula():
    freq = frequencies(128).double()
    for old, new in [(384, 896), (896, 1408), (1408, 1664), (128, 2560)]:
        got = yarn_update(freq, old, new)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, torch.tensor(yarn_reference(freq.tolist(), old, new), dtype=torch.float64),
                                   rtol=1e-14, atol=0)
        rotations = old * freq / (2 * math.pi)
        fast, slow = rotations >= 32, (rotations <= 1) & (freq > 0)
        assert slow.any() and fast.any() == (old > 32 * 2 * math.pi)  # ω_0 = 1 turns old/2π times
        assert torch.equal(got[fast], freq[fast])  # many turns inside the old window: kept
        torch.testing.assert_close(got[slow], freq[slow] * old / new, rtol=1e-15, atol=0)  # few: interpolated
        assert torch.all(got[freq == 0] == 0)
    custom = yarn_update(freq, 384, 896, alpha=2, beta=8)
    torch.testing.assert_close(custom, torch.tensor(yarn_reference(freq.tolist(), 384, 896, 2, 8), dtype=torch.float64),
                               rtol=1e-14, atol=0)


def test_yarn_scale():
    assert yarn_scale(384, 896) == pytest.approx(1 + 0.2 * math.log(896 / 384), rel=1e-15)
    assert yarn_scale(640, 640) == 1.0


def test_yarn_state_folds_each_change_once():
    freq = frequencies(128)
    windows = [384, 384, 384, 896, 896, 1408, 1408, 1408, 1664]
    by_hand, scale = freq, 0.1
    for old, new in [(384, 896), (896, 1408), (1408, 1664)]:
        by_hand, scale = yarn_update(by_hand, old, new), scale * yarn_scale(old, new)
    got_freq, got_scale = yarn_state(freq, 0.1, windows)
    assert torch.equal(got_freq, by_hand) and got_scale == scale
    # resuming: the state at any step is the fold over the windows up to it
    assert torch.equal(yarn_state(freq, 0.1, windows[:5])[0], yarn_update(freq, 384, 896))
    for constant in ([], [896], [896] * 7):
        same_freq, same_scale = yarn_state(freq, 0.1, constant)
        assert torch.equal(same_freq, freq) and same_scale == 0.1


# ---------------------------------------------------------------- varlen windows


def varlen_predicate(docs: list[list[int]], window: float, seq_len: int) -> torch.Tensor:
    """(B, T, T) reference: key allowed iff same document and 0 <= q - k <= window."""
    allowed = torch.zeros(len(docs), seq_len, seq_len, dtype=torch.bool)
    for b, row in enumerate(docs):
        for q in range(seq_len):
            for k in range(seq_len):
                allowed[b, q, k] = row[q] == row[k] and 0 <= q - k <= window
    return allowed


def block_mask_as_dense(mask, batch: int, seq_len: int, block: int) -> torch.Tensor:
    """What a compiled kernel computes from a BlockMask: full blocks all allowed, partial ones by
    the mask_mod, unlisted ones not at all."""
    dense = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    pos = torch.arange(block)
    for b in range(batch):
        mb = min(b, mask.kv_num_blocks.size(0) - 1)
        for qb in range(seq_len // block):
            q = qb * block + pos[:, None]
            for kb in mask.full_kv_indices[mb, 0, qb, :mask.full_kv_num_blocks[mb, 0, qb]].tolist():
                dense[b, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
            for kb in mask.kv_indices[mb, 0, qb, :mask.kv_num_blocks[mb, 0, qb]].tolist():
                kv = kb * block + pos[None, :]
                dense[b, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = \
                    mask.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
    return dense


T_VARLEN, BLOCK_VARLEN = 64, 16
BOS_VARLEN = [[0, 15, 16, 40], [5, 33, 34, 63]]


def as_dense(mask, batch: int, seq_len: int) -> torch.Tensor:
    """(B, T, T) from either SDPA mask: a dense one, or a BandedMask spread back over the keys (key
    i of chunk c's window is position c·chunk - span + chunk + i; padding before 0 is dropped)."""
    if not isinstance(mask, attention.BandedMask):
        return mask[:, 0].expand(batch, -1, -1)
    dense = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    allowed = mask.allowed.expand(batch, -1, -1, -1)
    for c in range(seq_len // mask.chunk):
        for i in range(mask.span):
            key = c * mask.chunk - mask.span + mask.chunk + i
            if key >= 0:
                dense[:, c * mask.chunk:(c + 1) * mask.chunk, key] = allowed[:, c, :, i]
    return dense


@pytest.mark.parametrize("window,short", [(16, None), (21, None), (33, 7), (NO_WINDOW, 16)])
def test_varlen_masks_against_the_predicate(window, short):
    idx = tokens_with_bos(2, T_VARLEN, BOS_VARLEN)
    docs_ref = looped_documents(idx)
    docs = document_ids(idx)
    expected = {"L": varlen_predicate(docs_ref, window, T_VARLEN),
                "S": varlen_predicate(docs_ref, window / 2 if short is None else short, T_VARLEN)}
    cfg = ModelConfig(attention="sdpa", document_mask=True, sliding_window=True, window_granularity="varlen",
                      window_block=BLOCK_VARLEN)
    dense = build_masks(idx, window, cfg, short)
    flex = flex_masks(docs, window, T_VARLEN, BLOCK_VARLEN, "cpu", "varlen", short)
    q, k, v = (randn(2, 2, T_VARLEN, 8, seed=s) for s in range(3))
    n = T_VARLEN // BLOCK_VARLEN
    for letter in ("L", "S"):
        assert torch.equal(as_dense(dense[letter], 2, T_VARLEN), expected[letter])
        assert torch.equal(block_mask_as_dense(flex[letter], 2, T_VARLEN, BLOCK_VARLEN), expected[letter])
        blocks = expected[letter].view(2, n, BLOCK_VARLEN, n, BLOCK_VARLEN)
        every, some = blocks.all(4).all(2), blocks.any(4).any(2)  # lists: exactly the full and the partial blocks
        assert torch.equal(flex[letter].full_kv_num_blocks[:, 0], every.sum(-1, dtype=torch.int32))
        assert torch.equal(flex[letter].kv_num_blocks[:, 0], (some & ~every).sum(-1, dtype=torch.int32))
        torch.testing.assert_close(attend(q, k, v, flex[letter], 0.3), attend(q, k, v, dense[letter], 0.3),
                                   atol=1e-5, rtol=1e-5)


def test_varlen_without_documents_and_with_a_window_tensor():
    cfg = ModelConfig(attention="sdpa", sliding_window=True, window_granularity="varlen", window_block=BLOCK_VARLEN)
    idx = tokens_with_bos(1, T_VARLEN, [[]])
    expected = varlen_predicate([[0] * T_VARLEN], 20, T_VARLEN)
    for window in (20, torch.tensor(20)):  # without documents the mask is one (T, T) for every row
        assert torch.equal(build_masks(idx, window, cfg)["L"].reshape(1, T_VARLEN, T_VARLEN), expected)
    flex = flex_masks(None, torch.tensor(20, dtype=torch.int32), T_VARLEN, BLOCK_VARLEN, "cpu", "varlen")
    assert torch.equal(block_mask_as_dense(flex["L"], 1, T_VARLEN, BLOCK_VARLEN), expected)


def test_varlen_rule_reaches_one_key_further_than_the_token_rule():
    assert window_rule_block(ModelConfig(window_granularity="varlen")) == VARLEN
    assert window_rule_block(ModelConfig(window_granularity="token")) is None
    assert window_rule_block(ModelConfig(window_granularity="block", window_block=64)) == 64
    q, kv = torch.tensor(40), torch.arange(41)
    varlen = mask_rule(None, 10, 1, VARLEN)(0, 0, q, kv)
    token = mask_rule(None, 10, 1, None)(0, 0, q, kv)
    assert varlen.nonzero().flatten().tolist() == list(range(30, 41))
    assert token.nonzero().flatten().tolist() == list(range(31, 41))
    for window, shrink in [(10, 1), (10, 2), (11, 2), (384, 2)]:  # a KV cache must hold exactly this many
        reach = mask_rule(None, window, shrink, VARLEN)(0, 0, torch.tensor(1000), torch.arange(1001)).sum().item()
        assert farthest_key(window, shrink, VARLEN) == reach
    assert farthest_key(10, 1, None) == 10 and farthest_key(200, 2, 128) == 128  # the other rules as before


# ---------------------------------------------------------------- paired heads


def test_pair_rows_layout():
    x = randn(2, 5, 6, 4, seed=4)
    rows = to_pair_rows(x)
    assert rows.shape == (2, 10, 3, 4)
    for t in range(5):
        for s in range(2):
            for j in range(3):
                assert torch.equal(rows[:, 2 * t + s, j], x[:, t, 3 * s + j])
    assert torch.equal(from_pair_rows(rows), x)
    with pytest.raises(ValueError, match="even number of heads, got 5"):
        to_pair_rows(randn(1, 4, 5, 2))


def paired_attention_reference(q, k, v, docs: list[list[int]], window: int, scale: float, freq) -> torch.Tensor:
    """Slow paired-head attention: head h of token t, rotated at 2t + h % 2 (adjacent pairs), is
    row 2t + h // (H/2), slot h % (H/2); each row attends to the earlier rows of its slot in its
    token's document at most `window` rows back; row 2t + s, slot j is head s·H/2 + j's output."""
    B, T, H, D = q.shape
    half = H // 2
    positions = torch.tensor([[2 * t + h % 2 for h in range(H)] for t in range(T)])
    q, k = (complex_rotation(x, positions, freq, "adjacent") for x in (q, k))
    v = v.double()
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for row in range(2 * T):
            for slot in range(half):
                head = lambda r: (r % 2) * half + slot
                keys = [r for r in range(row + 1) if docs[b][r // 2] == docs[b][row // 2] and row - r <= window]
                scores = torch.stack([q[b, row // 2, head(row)] @ k[b, r // 2, head(r)] for r in keys]) * scale
                weights = torch.softmax(scores, dim=0)
                out[b, row // 2, head(row)] = sum(w * v[b, r // 2, head(r)] for w, r in zip(weights, keys))
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_paired_head_attention_against_a_slow_construction(backend, monkeypatch):
    if backend == "flex":  # CPU takes SDPA in training; let flex run here, eagerly, on its BlockMasks
        monkeypatch.setitem(attention.BACKENDS, "flex",
                            dataclasses.replace(attention.BACKENDS["flex"], runs=lambda cfg, seq_len, device: True))
    B, T, H, D, scale = 2, 16, 4, 8, 0.4
    idx = tokens_with_bos(B, T, [[0, 6, 7], [3, 15]])
    cfg = ModelConfig(attention=backend, document_mask=True, sliding_window=True, window_granularity="varlen",
                      window_block=8, n_head=H, head_dim=D)
    q, k, v = (randn(B, T, H, D, seed=s) for s in (5, 6, 7))
    freq = frequencies(D)
    tables = paired_tables(freq, 0, T)
    q_rot, k_rot = rotate_paired(q, tables, "adjacent"), rotate_paired(k, tables, "adjacent")
    masks = build_masks(idx, 9, cfg, short=4, paired=True)
    assert isinstance(masks["L"], torch.Tensor if backend == "sdpa" else attention.BlockMask)
    for letter, window in (("L", 9), ("S", 4)):
        rows = [to_pair_rows(x).transpose(1, 2) for x in (q_rot, k_rot, v)]
        y = from_pair_rows(attend(*rows, masks[letter], scale).transpose(1, 2))
        expected = paired_attention_reference(q, k, v, looped_documents(idx), window, scale, freq)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_paired_masks_follow_token_documents():
    idx = tokens_with_bos(1, 8, [[0, 3]])
    cfg = ModelConfig(attention="sdpa", document_mask=True, sliding_window=True, window_granularity="varlen")
    row_docs = [[d for d in looped_documents(idx)[0] for _ in range(2)]]
    assert torch.equal(build_masks(idx, 5, cfg, paired=True)["L"][:, 0], varlen_predicate(row_docs, 5, 16))
    plain = ModelConfig(attention="sdpa")
    assert build_masks(idx, NO_WINDOW, plain, paired=True) == {"L": None, "S": None}  # causal over rows


# ---------------------------------------------------------------- key offset, XSA


def test_key_offset_shifts_exactly_the_second_half():
    k = randn(2, 7, 3, 8, seed=8)
    before = k.clone()
    out = key_offset(k)
    assert torch.equal(k, before)  # functional
    assert torch.equal(out[..., :4], k[..., :4])
    assert torch.equal(out[:, 0, :, 4:], k[:, 0, :, 4:])
    for t in range(1, 7):
        assert torch.equal(out[:, t, :, 4:], k[:, t - 1, :, 4:])


def test_xsa():
    y, v = randn(2, 5, 3, 8, seed=9), randn(2, 5, 3, 8, seed=10)
    alpha = randn(2, 5, 3, seed=11)
    assert torch.equal(xsa(y, v, torch.zeros(2, 5, 3)), y)
    removed = xsa(y, v, torch.full((2, 5, 3), 20.0))  # tanh(20) is 1 in float32
    assert (removed * v).sum(-1).abs().max() < 1e-5
    yd, vd = y.double(), v.double()
    coef = torch.tanh(alpha.double())[..., None] * (yd * vd).sum(-1, keepdim=True) / (vd * vd).sum(-1, keepdim=True)
    torch.testing.assert_close(xsa(y, v, alpha).double(), yd - coef * vd, atol=1e-6, rtol=1e-6)
    zero_v = xsa(y, torch.zeros_like(v), alpha)
    assert torch.equal(zero_v, y)  # the clamp keeps a zero value from dividing by zero


# ---------------------------------------------------------------- composable attention


def composable_reference(q, k, v, w1, w2, scale: float, window: int, docs: list[list[int]] | None):
    """Dense T×T construction with an explicit mask: per head softmax over allowed keys, heads
    mixed by rms-normalised w1, each head's share scaled by w2."""
    B, T, H, D = q.shape
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for j in range(T):
                same = docs is None or docs[b][t] == docs[b][j]
                allowed[b, t, j] = same and 0 <= t - j < window
    scores = torch.einsum("bthd,bjhd->bhtj", q, k) * scale
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    mix = w1 / (w1.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    composed = torch.einsum("bth,bhtj->btj", mix, probs)
    return torch.einsum("bth,btj,bjhd->bthd", w2, composed, v)


def composable_inputs(B, T, H, D, dtype=torch.float64):
    return [randn(B, T, H, D, seed=s, dtype=dtype).requires_grad_() for s in (12, 13, 14)] + \
           [randn(B, T, H, seed=s, dtype=dtype).requires_grad_() for s in (15, 16)]


@pytest.mark.parametrize("window", [1, 4, 7, 40])
@pytest.mark.parametrize("with_docs", [True, False])
def test_composable_attention_and_its_gradients(window, with_docs):
    B, T, H, D, scale = 2, 19, 3, 4, 0.7
    idx = tokens_with_bos(B, T, [[0, 5, 6, 12], [9]])
    docs = document_ids(idx) if with_docs else None
    ref_docs = looped_documents(idx) if with_docs else None
    inputs = composable_inputs(B, T, H, D)
    out = composable_attention(*inputs, scale, window, docs)
    ref_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    expected = composable_reference(*ref_inputs, scale, window, ref_docs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    upstream = randn(B, T, H, D, seed=17, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(expected, ref_inputs, upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_composable_attention_in_low_precision(dtype, tol):
    B, T, H, D = 1, 24, 6, 16
    idx = tokens_with_bos(B, T, [[0, 10]])
    inputs = [x.detach() for x in composable_inputs(B, T, H, D)]
    q, k, v = (x / x.norm(dim=-1, keepdim=True) * 2 for x in inputs[:3])  # QK-normed-like magnitudes
    expected = composable_reference(q, k, v, *inputs[3:], 0.5, 5, looped_documents(idx))
    low = [x.to(dtype).requires_grad_() for x in (q, k, v, *inputs[3:])]
    out = composable_attention(*low, 0.5, 5, document_ids(idx))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    out.float().square().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in low)


def test_composable_attention_refuses_an_empty_window():
    with pytest.raises(ValueError, match="at least one key, got 0"):
        composable_attention(*[x.detach() for x in composable_inputs(1, 4, 2, 2)], 1.0, 0, None)


@pytest.mark.gpu
def test_compiled_flex_varlen_and_paired_masks_on_cuda():
    """The compiled kernel uses the block lists (eager flex ignores them): varlen masks over tokens
    and over paired rows, and composable attention in bf16, against float64 references."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    B, T, H, D, block = 2, 256, 4, 64, 128
    idx = tokens_with_bos(B, T, [[0, 100, 101, 200], [37, 255]]).cuda()
    cfg = ModelConfig(attention="flex", document_mask=True, sliding_window=True, window_granularity="varlen",
                      window_block=block, n_head=H, head_dim=D)
    q, k, v = (randn(B, T, H, D, seed=s).cuda() for s in (20, 21, 22))
    docs = looped_documents(idx.cpu())
    window = torch.tensor(150, device="cuda", dtype=torch.int32)
    plain = build_masks(idx, window, cfg, short=60)
    for letter, size in (("L", 150), ("S", 60)):
        allowed = varlen_predicate(docs, size, T)
        scores = torch.einsum("bthd,bjhd->bhtj", q.double().cpu(), k.double().cpu()) * 0.1
        expected = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v.double().cpu().transpose(1, 2)
        got = compiled(*(x.bfloat16().transpose(1, 2) for x in (q, k, v)), block_mask=plain[letter], scale=0.1)
        torch.testing.assert_close(got.double().cpu(), expected, atol=3e-2, rtol=3e-2)
    freq = base_frequencies(cfg, "cuda")
    paired = build_masks(idx, window, cfg, short=60, paired=True)
    tables = paired_tables(freq, 0, T)
    rows = [to_pair_rows(x).transpose(1, 2).bfloat16() for x in (rotate_paired(q, tables, "adjacent"),
                                                                  rotate_paired(k, tables, "adjacent"), v)]
    y = from_pair_rows(compiled(*rows, block_mask=paired["S"], scale=0.4).transpose(1, 2))
    expected = paired_attention_reference(q[:1, :24].cpu(), k[:1, :24].cpu(), v[:1, :24].cpu(), docs[:1], 60, 0.4,
                                          freq.cpu())
    torch.testing.assert_close(y[:1, :24].double().cpu(), expected, atol=3e-2, rtol=3e-2)  # causal: a prefix suffices
    w1, w2 = randn(B, T, H, seed=23).cuda(), randn(B, T, H, seed=24).cuda()
    qn, kn = (x / x.norm(dim=-1, keepdim=True) * 3 for x in (q, k))
    got = composable_attention(qn.bfloat16(), kn.bfloat16(), v.bfloat16(), w1, w2, 0.4, 112, document_ids(idx))
    want = composable_reference(*(x.double().cpu() for x in (qn, kn, v, w1, w2)), 0.4, 112, docs)
    torch.testing.assert_close(got.double().cpu(), want, atol=5e-2, rtol=5e-2)
