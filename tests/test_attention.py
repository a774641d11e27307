"""Attention masks: both backends against an unfused reference, for the record's block-granular
windows and the token-exact ones, and the block structure that a compiled FlexAttention kernel
relies on (eager flex_attention ignores block sparsity, so the block lists are checked on their
own)."""

import math
import warnings
from fractions import Fraction

import pytest
import torch

from speedrun.attention import (NO_WINDOW, SHRINK, BandedMask, attend, build_masks, dense_mask, document_ids,
                                flex_masks, use_flex, window_rule_block, window_tokens)
from speedrun.config import load_config
from speedrun.data.tokenizer import EOT

T, BLOCK, HEADS, HEAD_DIM, SCALE = 512, 128, 2, 16, 0.12

@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def tokens(layout: str, seed: int = 0) -> torch.Tensor:
    """(2, T) tokens without BOS except where the layout puts them; the two rows differ."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, EOT, (2, T), generator=g)
    if layout == "start":
        idx[:, 0] = EOT
    elif layout == "block_edges":  # documents ending and starting exactly at block boundaries
        idx[0, [0, 127, 128, 256]] = EOT
        idx[1, [255, 383, 384, 511]] = EOT
    elif layout == "many":
        idx[torch.rand(2, T, generator=g) < 0.03] = EOT
    else:
        assert layout == "none"
    return idx


def allowed_reference(idx: torch.Tensor, window: int, shrink: int, document_mask: bool,
                      granularity: str = "token") -> torch.Tensor:
    """(B, T, T) mask written independently of the library: loops over tokens for the documents.
    Token windows: query - key < window / shrink. Block windows (the record's): a query in block i
    sees key blocks i - n + 1 .. i, n = (window // BLOCK) // shrink but at least the diagonal."""
    B, n = idx.shape
    pos = torch.arange(n).double()
    if granularity == "token":
        near = pos[:, None] - pos[None, :] < window / shrink
    else:
        blocks = max((window // BLOCK) // shrink, 1)
        near = (pos[:, None] // BLOCK) - (pos[None, :] // BLOCK) < blocks
    allowed = ((pos[:, None] >= pos[None, :]) & near).repeat(B, 1, 1)
    if document_mask:
        for b in range(B):
            doc, current = [], 0
            for t in idx[b].tolist():
                current += t == EOT
                doc.append(current)
            doc = torch.tensor(doc)
            allowed[b] &= doc[:, None] == doc[None, :]
    return allowed


def attention_reference(q, k, v, allowed):
    scores = (q.double() @ k.double().transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.double()).to(q.dtype)


def qkv(seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, T, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3)]


# 200 and 129 are not whole blocks (nor, halved, whole tokens): the token rule is exact, the
# block rule floors them to whole blocks; 128 and 129 leave S layers only the diagonal block
CASES = [(layout, window, document_mask, granularity)
         for layout in ["none", "start", "block_edges", "many"]
         for window in [128, 129, 200, 384, NO_WINDOW]
         for document_mask in [True, False]
         for granularity in ["block", "token"]]


@pytest.mark.parametrize("layout,window,document_mask,granularity", CASES)
def test_flex_equals_reference(layout, window, document_mask, granularity):
    idx = tokens(layout)
    docs = document_ids(idx) if document_mask else None
    q, k, v = qkv()
    masks = flex_masks(docs, window, T, BLOCK, idx.device, granularity)
    for letter, shrink in SHRINK.items():
        expected = attention_reference(q, k, v, allowed_reference(idx, window, shrink, document_mask, granularity))
        torch.testing.assert_close(attend(q, k, v, masks[letter], SCALE), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout,window,document_mask,granularity", CASES)
def test_sdpa_equals_reference(layout, window, document_mask, granularity):
    cfg = load_config("tiny-2025").model
    cfg.attention, cfg.document_mask, cfg.sliding_window = "sdpa", document_mask, window != NO_WINDOW
    cfg.window_granularity = granularity
    idx = tokens(layout)
    masks = build_masks(idx, window, cfg)
    if not document_mask and window == NO_WINDOW:
        assert masks["L"] is None  # the plain causal fast path
        masks = {"L": dense_mask(None, NO_WINDOW, 1, 2, T, "cpu"), "S": dense_mask(None, NO_WINDOW, 2, 2, T, "cpu")}
    q, k, v = qkv()
    for letter, shrink in SHRINK.items():
        expected = attention_reference(q, k, v, allowed_reference(idx, window, shrink, document_mask, granularity))
        torch.testing.assert_close(attend(q, k, v, masks[letter], SCALE), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "token", "varlen"])
@pytest.mark.parametrize("document_mask", [True, False])
def test_short_windows_attend_by_chunks_as_the_dense_mask(granularity, document_mask):
    """A window that reaches at most a quarter of the sequence back gets a BandedMask (chunks of
    window_block queries against the keys they can reach); it gives the dense mask's outputs and
    gradients. A longer window keeps the dense mask."""
    cfg = load_config("tiny-2025").model
    cfg.attention, cfg.document_mask, cfg.window_granularity = "sdpa", document_mask, granularity
    idx = tokens("many")
    docs = document_ids(idx) if document_mask else None
    masks = build_masks(idx, 128, cfg)  # reaches 128 positions back (varlen) or 127: a quarter of T
    assert all(isinstance(m, BandedMask) for m in masks.values())
    assert all(isinstance(m, torch.Tensor) for m in build_masks(idx, 256, cfg, short=256).values())
    for letter, shrink in SHRINK.items():
        dense = dense_mask(docs, 128, shrink, 2, T, "cpu", window_rule_block(cfg))
        outputs, grads = [], []
        for mask in (masks[letter], dense):
            q, k, v = (x.requires_grad_() for x in qkv())
            out = attend(q, k, v, mask, SCALE)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            outputs.append(out.detach())
            grads.append([x.grad for x in (q, k, v)])
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def listed_blocks(mask, b: int, qb: int) -> tuple[list[int], list[int]]:
    """(full, partial) key blocks a BlockMask lists for query block qb of batch row b, in order."""
    mb = min(b, mask.kv_num_blocks.size(0) - 1)  # a mask without documents has batch 1
    full = mask.full_kv_indices[mb, 0, qb, :mask.full_kv_num_blocks[mb, 0, qb]].tolist()
    partial = mask.kv_indices[mb, 0, qb, :mask.kv_num_blocks[mb, 0, qb]].tolist()
    return full, partial


@pytest.mark.parametrize("layout,window,document_mask,granularity", CASES)
def test_block_lists_classify_every_block(layout, window, document_mask, granularity):
    """A kv block is listed "full" exactly when every (q, kv) pair in it is allowed, "partial"
    when some but not all are, and not at all when none is. Under the block rule that is the
    record's mask: the nearest n key blocks, document-causal inside them, listed nearest first."""
    idx = tokens(layout)
    docs = document_ids(idx) if document_mask else None
    n = T // BLOCK
    masks = flex_masks(docs, window, T, BLOCK, idx.device, granularity)
    for letter, shrink in SHRINK.items():
        blocks = allowed_reference(idx, window, shrink, document_mask, granularity).view(2, n, BLOCK, n, BLOCK)
        want_full, want_some = blocks.all(4).all(2), blocks.any(4).any(2)
        for b in range(2):
            for qb in range(n):
                full, partial = listed_blocks(masks[letter], b, qb)
                assert sorted(full) == want_full[b, qb].nonzero().flatten().tolist()
                assert sorted(partial) == (want_some & ~want_full)[b, qb].nonzero().flatten().tolist()
                if granularity == "block":
                    assert full == sorted(full, reverse=True) and partial == sorted(partial, reverse=True)
                    assert len(full) + len(partial) <= max((window // BLOCK) // shrink, 1)


def test_block_rule_on_a_long_document():
    """The record's counts on one document spanning every block: long layers see n blocks (n - 1
    full and the diagonal partial), short layers n // 2 (never less than the diagonal)."""
    idx = tokens("start")[:1]
    for window_blocks, short_blocks in [(1, 1), (2, 1), (3, 1), (4, 2)]:
        masks = flex_masks(document_ids(idx), window_blocks * BLOCK, T, BLOCK, idx.device, "block")
        for letter, blocks in (("L", window_blocks), ("S", short_blocks)):
            full, partial = listed_blocks(masks[letter], 0, 3)
            assert partial == [3] and full == list(range(2, 3 - blocks, -1))


@pytest.mark.parametrize("granularity,block", [("block", BLOCK), ("token", None)])
def test_window_tensor_gives_the_same_masks(granularity, block):
    idx = tokens("many")
    docs = document_ids(idx)
    as_int = flex_masks(docs, 256, T, BLOCK, idx.device, granularity)
    as_tensor = flex_masks(docs, torch.tensor(256, dtype=torch.int32), T, BLOCK, idx.device, granularity)
    q, k, v = qkv()
    for letter, shrink in SHRINK.items():
        a, b = as_int[letter], as_tensor[letter]
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
        torch.testing.assert_close(attend(q, k, v, a, SCALE), attend(q, k, v, b, SCALE))
        assert torch.equal(dense_mask(docs, 256, shrink, 2, T, "cpu", block),
                           dense_mask(docs, torch.tensor(256), shrink, 2, T, "cpu", block))


def test_backend_choice():
    cfg = load_config("gpt2-speedrun-2025").model
    assert use_flex(cfg, 1024, torch.device("cuda"))
    assert not use_flex(cfg, 1024, torch.device("cpu"))  # no flex backward on CPU
    assert not use_flex(cfg, 1000, torch.device("cuda"))  # not whole blocks
    cfg.attention = "sdpa"
    assert not use_flex(cfg, 1024, torch.device("cuda"))


def test_record_window_schedule():
    """The record's rule: 1728·t/T rounded up to a multiple of 128, at least 128."""
    cfg = load_config("gpt2-speedrun-2025").model
    steps = 1770
    windows = [window_tokens(s, steps, cfg) for s in range(steps + 1)]
    reference = [max(128, math.ceil(Fraction(1728 * s, steps) / 128) * 128) for s in range(steps + 1)]
    assert windows == reference
    assert set(windows[:132]) == {128} and windows[132] == 256 and windows[-2] == windows[-1] == 1792


def test_linear_window_schedule():
    cfg = load_config("gpt2-speedrun-2025", overrides=["model.window_schedule=linear"]).model
    steps = 1770
    windows = [window_tokens(s, steps, cfg) for s in range(steps + 1)]
    assert windows[0] == cfg.window_min and windows[-1] == cfg.window_max
    assert all(w % cfg.window_block == 0 for w in windows)
    assert all(a <= b for a, b in zip(windows, windows[1:]))
    assert len(set(windows)) == (cfg.window_max - cfg.window_min) // cfg.window_block + 1
    # linear: halfway through, the exact window 128 + 1664/2 = 960 rounds up to 1024
    assert window_tokens(885, steps, cfg) == 1024
    assert window_tokens(steps + 5, steps, cfg) == cfg.window_max
    cfg.sliding_window = False
    assert window_tokens(0, steps, cfg) == NO_WINDOW > 10 ** 8


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["none", "block_edges", "many"])
def test_compiled_flex_on_cuda_equals_reference(layout):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    idx = tokens(layout).cuda()
    docs = document_ids(idx)
    q, k, v = qkv(device="cuda", dtype=torch.bfloat16)
    for granularity in ("block", "token"):
        masks = flex_masks(docs, torch.tensor(384, device="cuda", dtype=torch.int32), T, BLOCK, idx.device, granularity)
        for letter, shrink in SHRINK.items():
            expected = attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(),
                                           allowed_reference(idx.cpu(), 384, shrink, True, granularity))
            out = compiled(q, k, v, block_mask=masks[letter], scale=SCALE)
            torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)


def test_block_lists_put_the_nearest_selected_blocks_first():
    """_as_ordered against a plain sort of each row (selected key blocks, highest index first, then
    the rest, likewise), on grids from empty to full. Compiled, on CUDA, by the test below."""
    from speedrun.attention import _as_ordered

    g = torch.Generator().manual_seed(0)
    grids = [torch.rand(B, n, n, generator=g) < density for B, n in [(1, 1), (2, 3), (3, 8), (1, 33)]
             for density in (0.0, 0.3, 0.8, 1.0)]
    for grid in grids:
        n = grid.size(-1)
        expected = torch.tensor([[sorted(range(n), key=lambda kv: (bool(row[kv]), kv), reverse=True)
                                  for row in rows.tolist()] for rows in grid], dtype=torch.int32)
        count, indices = _as_ordered(grid)
        assert count.dtype == indices.dtype == torch.int32
        assert torch.equal(count, grid.sum(-1, dtype=torch.int32)[:, None])
        assert torch.equal(indices, expected[:, None])


@pytest.mark.gpu
def test_masks_built_in_a_compiled_graph_equal_eager_ones_on_cuda():
    """A compiled model builds its BlockMasks inside its graph, where Inductor generates the code on
    CUDA: the lists (both directions, partial and full) must equal those built eagerly."""
    for layout in ("none", "block_edges", "many"):
        docs = document_ids(tokens(layout).cuda())
        window = torch.tensor(384, device="cuda", dtype=torch.int32)
        build = lambda docs, window: flex_masks(docs, window, T, BLOCK, docs.device)  # noqa: E731
        eager, compiled = build(docs, window), torch.compile(build, dynamic=False)(docs, window)
        for letter in SHRINK:
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                         "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
                a, b = getattr(eager[letter], name), getattr(compiled[letter], name)
                assert torch.equal(a, b), f"{layout}, {letter}: {name} differs"


def test_every_attention_backend_is_a_config_choice_and_back():
    from speedrun import config
    from speedrun.attention import BACKENDS, FALLBACK

    assert set(config._CHOICES[("model", "attention")]) == set(BACKENDS) and FALLBACK in BACKENDS


def test_attend_runs_the_backend_that_owns_the_mask(monkeypatch):
    import dataclasses

    from speedrun import attention

    seen = []
    for name, backend in list(attention.BACKENDS.items()):
        def recording(*args, name=name, original=backend.attend):
            seen.append(name)
            return original(*args)
        monkeypatch.setitem(attention.BACKENDS, name, dataclasses.replace(backend, attend=recording))
    q = k = v = torch.randn(1, 2, 128, 16)
    dense = dense_mask(None, 64, 1, 1, 128, "cpu", block=64)
    outs = [attend(q, k, v, mask, SCALE) for mask in (None, dense, flex_masks(None, 64, 128, 64, "cpu")["L"])]
    assert seen == ["sdpa", "sdpa", "flex"]
    torch.testing.assert_close(outs[1], outs[2], atol=1e-5, rtol=1e-5)  # the same window, two backends
    with pytest.raises(TypeError, match="no attention backend takes a mask of type str"):
        attend(q, k, v, "causal", SCALE)
