"""Attention masks: both backends against an unfused reference, and the block structure that a
compiled FlexAttention kernel relies on (eager flex_attention ignores block sparsity, so the
block lists are checked on their own)."""

import warnings

import pytest
import torch

from speedrun.attention import (BOS_TOKEN, NO_WINDOW, SHRINK, attend, build_masks, dense_mask, document_ids,
                                flex_masks, use_flex, window_tokens)
from speedrun.config import load_config

T, BLOCK, HEADS, HEAD_DIM, SCALE = 512, 128, 2, 16, 0.12

@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def tokens(layout: str, seed: int = 0) -> torch.Tensor:
    """(2, T) tokens without BOS except where the layout puts them; the two rows differ."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, BOS_TOKEN, (2, T), generator=g)
    if layout == "start":
        idx[:, 0] = BOS_TOKEN
    elif layout == "block_edges":  # documents ending and starting exactly at block boundaries
        idx[0, [0, 127, 128, 256]] = BOS_TOKEN
        idx[1, [255, 383, 384, 511]] = BOS_TOKEN
    elif layout == "many":
        idx[torch.rand(2, T, generator=g) < 0.03] = BOS_TOKEN
    else:
        assert layout == "none"
    return idx


def allowed_reference(idx: torch.Tensor, window: float, document_mask: bool) -> torch.Tensor:
    """(B, T, T) mask written independently of the library: loops over tokens for the documents."""
    B, n = idx.shape
    pos = torch.arange(n).double()
    allowed = ((pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)).repeat(B, 1, 1)
    if document_mask:
        for b in range(B):
            doc, current = [], 0
            for t in idx[b].tolist():
                current += t == BOS_TOKEN
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


# 200 and 129 are not whole blocks (nor, halved, whole tokens): the rule is exact, not block-wise
CASES = [(layout, window, document_mask)
         for layout in ["none", "start", "block_edges", "many"]
         for window in [128, 129, 200, 384, NO_WINDOW]
         for document_mask in [True, False]]


@pytest.mark.parametrize("layout,window,document_mask", CASES)
def test_flex_equals_reference(layout, window, document_mask):
    idx = tokens(layout)
    docs = document_ids(idx) if document_mask else None
    q, k, v = qkv()
    masks = flex_masks(docs, window, T, BLOCK, idx.device)
    for letter, shrink in SHRINK.items():
        expected = attention_reference(q, k, v, allowed_reference(idx, window / shrink, document_mask))
        torch.testing.assert_close(attend(q, k, v, masks[letter], SCALE), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout,window,document_mask", CASES)
def test_sdpa_equals_reference(layout, window, document_mask):
    cfg = load_config("tiny").model
    cfg.attention, cfg.document_mask, cfg.sliding_window = "sdpa", document_mask, window != NO_WINDOW
    idx = tokens(layout)
    masks = build_masks(idx, window, cfg)
    if not document_mask and window == NO_WINDOW:
        assert masks["L"] is None  # the plain causal fast path
    q, k, v = qkv()
    for letter, shrink in SHRINK.items():
        expected = attention_reference(q, k, v, allowed_reference(idx, window / shrink, document_mask))
        torch.testing.assert_close(attend(q, k, v, masks[letter], SCALE), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout,window,document_mask", CASES)
def test_block_lists_classify_every_block(layout, window, document_mask):
    """A kv block is listed "full" exactly when every (q, kv) pair in it is allowed, "partial"
    when some but not all are, and not at all when none is."""
    idx = tokens(layout)
    docs = document_ids(idx) if document_mask else None
    n = T // BLOCK
    masks = flex_masks(docs, window, T, BLOCK, idx.device)
    for letter, shrink in SHRINK.items():
        mask = masks[letter]
        blocks = allowed_reference(idx, window / shrink, document_mask).view(2, n, BLOCK, n, BLOCK)
        want_full, want_some = blocks.all(4).all(2), blocks.any(4).any(2)
        for b in range(2):
            mb = min(b, mask.kv_num_blocks.size(0) - 1)  # a mask without documents has batch 1
            for qb in range(n):
                full = mask.full_kv_indices[mb, 0, qb, :mask.full_kv_num_blocks[mb, 0, qb]].tolist()
                partial = mask.kv_indices[mb, 0, qb, :mask.kv_num_blocks[mb, 0, qb]].tolist()
                assert sorted(full) == want_full[b, qb].nonzero().flatten().tolist()
                assert sorted(partial) == (want_some & ~want_full)[b, qb].nonzero().flatten().tolist()


def test_window_tensor_gives_the_same_masks():
    idx = tokens("many")
    docs = document_ids(idx)
    as_int = flex_masks(docs, 256, T, BLOCK, idx.device)
    as_tensor = flex_masks(docs, torch.tensor(256, dtype=torch.int32), T, BLOCK, idx.device)
    q, k, v = qkv()
    for letter, shrink in SHRINK.items():
        a, b = as_int[letter], as_tensor[letter]
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
        torch.testing.assert_close(attend(q, k, v, a, SCALE), attend(q, k, v, b, SCALE))
        assert torch.equal(dense_mask(docs, 256, shrink, 2, T, "cpu"),
                           dense_mask(docs, torch.tensor(256), shrink, 2, T, "cpu"))


def test_backend_choice():
    cfg = load_config("gpt2-speedrun").model
    assert use_flex(cfg, 1024, torch.device("cuda"))
    assert not use_flex(cfg, 1024, torch.device("cpu"))  # no flex backward on CPU
    assert not use_flex(cfg, 1000, torch.device("cuda"))  # not whole blocks
    cfg.attention = "sdpa"
    assert not use_flex(cfg, 1024, torch.device("cuda"))


def test_window_schedule():
    cfg = load_config("gpt2-speedrun").model
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
    masks = flex_masks(docs, torch.tensor(256, device="cuda", dtype=torch.int32), T, BLOCK, idx.device)
    for letter, shrink in SHRINK.items():
        expected = attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(),
                                       allowed_reference(idx.cpu(), 256 / shrink, True))
        out = compiled(q, k, v, block_mask=masks[letter], scale=SCALE)
        torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
