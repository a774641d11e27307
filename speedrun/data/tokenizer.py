"""The GPT-2 tokenizer, built from the BPE ranks shipped as package data, so it never needs the
network (tiktoken's own `get_encoding("gpt2")` downloads its files on first use)."""

from __future__ import annotations

import base64
import functools
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from speedrun.errors import DataError

if TYPE_CHECKING:
    import tiktoken

# <|endoftext|>: the separator written before every document, so also the BOS token. The model
# imports it from here too, which is why tiktoken is only imported when an encoding is built.
EOT = 50256
VOCAB_SIZE = 50257
_RANKS_FILE = "gpt2.tiktoken"
_RANK_COUNT = 50256

# GPT-2's pre-tokenization regex, as tiktoken writes it for its "gpt2"/"r50k_base" encodings (the
# possessive quantifiers only make the regex engine faster; they split text the same way).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _load_ranks() -> dict[bytes, int]:
    source = resources.files("speedrun") / "assets" / _RANKS_FILE
    try:
        text = source.read_bytes()
    except OSError as e:
        raise DataError(f"GPT-2 vocabulary {source} is missing from the installed package ({e.strerror})") from None
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != _RANK_COUNT:
        raise DataError(f"GPT-2 vocabulary {source} has {len(ranks)} entries, expected {_RANK_COUNT}")
    return ranks


@functools.cache
def gpt2() -> tiktoken.Encoding:
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2-speedrun",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_documents(texts: list[str]) -> np.ndarray:
    """Tokens of the documents, each preceded by <|endoftext|>, as one uint16 array. Text that happens
    to spell "<|endoftext|>" is encoded as ordinary text, so only real boundaries get the token."""
    enc = gpt2()
    pieces = []
    for text in texts:
        pieces.append(np.array([EOT], dtype=np.uint16))
        pieces.append(np.asarray(enc.encode_ordinary(text), dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint16)


def decode(tokens) -> str:
    return gpt2().decode([int(t) for t in tokens])
