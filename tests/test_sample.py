"""Generation with the KV cache: the same logits and tokens as uncached forward passes over the whole
sequence, with windows shorter than the generation and documents starting mid-way, for the speedrun
(rotary) and the baseline (learned positions) models; and `speedrun sample` on a real checkpoint."""

import io

import pytest
import torch

from conftest import run_cli
from speedrun.attention import NO_WINDOW, Windows
from speedrun.config import load_config
from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import UsageError
from speedrun.generate import KVCache, generate, next_token
from speedrun.model import GPT
from speedrun.sample import sample
from test_export import saved_run, trained_run

WINDOW = 16

# (preset, model changes, window): blocks of 8 tokens so that the block rule's windows (2 blocks,
# 1 on S layers) are shorter than the generation; the baseline has no sliding window of its own,
# so it is also run with one, to cover windows with learned positions.
CASES = {
    "tiny-2025": ("tiny-2025", {"window_block": 8}, WINDOW),
    "tiny-token-window": ("tiny-2025", {"window_granularity": "token"}, WINDOW),
    "baseline-tiny": ("baseline-tiny", {}, NO_WINDOW),
    "baseline-tiny-windowed": ("baseline-tiny", {"sliding_window": True, "window_block": 8}, WINDOW),
}


def model_for(case):
    preset, changes, window = CASES[case]
    cfg = load_config(preset).model
    cfg.zero_init_head = cfg.zero_init_proj = False  # so the argmax is not the same token everywhere
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return GPT(cfg).eval(), window


def uncached_greedy(model, prompt, n, window):
    idx = prompt
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx, window_tokens=window)[:, -1:].argmax(-1)], dim=1)
    return idx[0, prompt.size(1):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_equal_uncached(case):
    model, window = model_for(case)
    idx = torch.randint(0, EOT, (2, 70), generator=torch.Generator().manual_seed(1))
    idx[:, 0] = EOT
    idx[0, 30] = EOT  # a document starting mid-way, in one row only
    cache = KVCache(model.cfg, Windows(window))
    with torch.no_grad():
        whole = model(idx, window_tokens=window)
        # a prompt, single tokens across the window's length, then a chunk longer than the window
        cuts = [0, 12] + list(range(13, 30)) + [30, 70]
        pieces = torch.cat([model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])], dim=1)
        if window != NO_WINDOW:  # the window changes the logits, so the test exercises it
            assert not torch.allclose(whole, model(idx), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)
    # the cache holds no more keys than the window reaches
    for letter, layer in zip(model.cfg.long_short_pattern, cache.layers):
        assert layer.k.size(2) == min(70, cache.keep[letter])


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_generation_equals_uncached(case):
    model, window = model_for(case)
    prompt = torch.tensor([[EOT] + gpt2().encode_ordinary("The quick brown fox")])
    n = 48  # with the prompt, three times the window
    tokens = list(generate(model, prompt, n, Windows(window)))
    assert tokens == uncached_greedy(model, prompt, n, window)


def test_next_token():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert next_token(logits, 0.0, None, None).tolist() == [[1]]
    assert next_token(logits, 5.0, 1, None).tolist() == [[1]]
    draws = {int(next_token(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {1, 2}
    first = [int(next_token(logits, 1.0, None, torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(first)) == 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_sample_command_prints_text(run):
    r = run_cli("sample", str(run), "--prompt", "The function", "--max-tokens", "24", "--seed", "0")
    assert r.stdout.startswith("The function") and len(r.stdout.strip()) > len("The function")
    assert r.stderr == ""


def test_sample_streams_the_decoded_tokens_and_seed_repeats(run):
    out = io.StringIO()
    tokens = sample(str(run), "Return the", max_tokens=20, temperature=1.0, top_k=50, seed=3, device="cpu", out=out)
    assert 0 < len(tokens) <= 20
    text = [t for t in tokens if t != EOT]
    assert out.getvalue() == "Return the" + gpt2().decode(text) + "\n"
    again = io.StringIO()
    assert sample(str(run), "Return the", max_tokens=20, temperature=1.0, top_k=50, seed=3, device="cpu", out=again) == tokens
    assert again.getvalue() == out.getvalue()


def test_learned_positions_bound_the_length(tmp_path):
    run = saved_run(tmp_path / "baseline", "baseline-tiny")
    with pytest.raises(UsageError, match="exceeds the 1024 positions"):
        sample(str(run), "Hello", max_tokens=1023, device="cpu", out=io.StringIO())


def test_missing_checkpoint_is_one_line_usage_error(tmp_path):
    r = run_cli("sample", str(tmp_path / "nowhere"), check=False)
    assert r.returncode == 2
    assert r.stderr.startswith(f"speedrun sample: error: {tmp_path / 'nowhere'}: no checkpoint there")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cached_logits_equal_uncached_with_a_scheduled_short_window():
    """The 2026 record validates with S-layer windows that are not half the long one (6 and 20
    blocks): a KV cache given both windows gives an uncached forward's logits."""
    cfg = load_config("tiny-2025", overrides=["model.window_block=16", "model.zero_init_proj=false",
                                         "model.zero_init_head=false"]).model
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, EOT, (1, 70), generator=torch.Generator().manual_seed(2))
    idx[:, 0] = EOT
    windows = Windows(64, 16)
    cache = KVCache(cfg, windows)
    with torch.no_grad():
        whole = model(idx, **windows.kwargs())
        assert not torch.allclose(whole, model(idx, window_tokens=64), rtol=1e-2, atol=1e-2)
        pieces = torch.cat([model(idx[:, a:b], cache=cache) for a, b in ((0, 20), (20, 21), (21, 70))], dim=1)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)
