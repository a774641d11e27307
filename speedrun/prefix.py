"""The prefix-token table of the 2026 record's auxiliary loss (record-2026.md §3 L2): for each token,
the token spelling the longest proper prefix of its bytes, so the head also learns, at every
position, the shorter token that the next token extends.

Built from the BPE vocabulary alone, never from training data; the model looks its targets up in it
(table[targets]) and LMHead weighs the cross-entropy against them."""

from __future__ import annotations

import torch

from speedrun.data.tokenizer import _load_ranks


def prefix_table(ranks: dict[bytes, int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: entry i is the id of the token whose bytes are the longest proper prefix
    of token i's bytes, -1 where no proper prefix is a token (every single byte) and for ids no
    byte string has (special tokens, padding). Tokens with an id >= vocab_size are not in the
    vocabulary: they are neither mapped nor prefixes."""
    vocab = {token: i for token, i in ranks.items() if i < vocab_size}
    if len(set(vocab.values())) != len(vocab) or any(i < 0 for i in vocab.values()):
        raise ValueError("ranks must give every byte string its own non-negative id")
    table = [-1] * vocab_size
    for token, i in vocab.items():
        # BPE tokens are short (GPT-2's longest is 128 bytes), so probing every shorter prefix,
        # longest first, is cheap: about 0.3 M dict look-ups for GPT-2's vocabulary
        for end in range(len(token) - 1, 0, -1):
            prefix = vocab.get(token[:end])
            if prefix is not None:
                table[i] = prefix
                break
    return torch.tensor(table, dtype=torch.int64)


def gpt2_prefix_table(vocab_size: int) -> torch.Tensor:
    """prefix_table of the GPT-2 BPE ranks shipped with the package (no network); <|endoftext|> and
    any padding ids map to -1."""
    return prefix_table(_load_ranks(), vocab_size)
