"""`speedrun sample`: text from a trained model, streamed to the terminal as it is generated. The
prompt is one document: <|endoftext|> (BOS) and then its tokens. Decoding is `speedrun.generate`'s:
each new token is one forward pass of that token alone over a KV cache, with the attention window
the run ended with."""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import UsageError
from speedrun.generate import generate
from speedrun.loading import final_window, load_model
from speedrun.prepare import prepare


def sample(path: str, prompt: str = "", max_tokens: int = 256, temperature: float = 0.8, top_k: int | None = 200,
           seed: int | None = None, device: str = "auto", out=None) -> list[int]:
    """Write the prompt, then the continuation as it is generated, to `out` (default stdout); stop
    at <|endoftext|> (the document ends) or after max_tokens. Returns the generated tokens. top_k
    None samples from every token."""
    if max_tokens < 0:
        raise UsageError(f"--max-tokens must be at least 0, got {max_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature must be at least 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be positive (or 0 for every token), got {top_k}")
    cfg, model = load_model(path, device)
    tokens = [EOT] + gpt2().encode_ordinary(prompt)
    if cfg.model.positional == "learned" and len(tokens) + max_tokens > cfg.model.max_seq_len:
        raise UsageError(f"the prompt ({len(tokens)} tokens with BOS) plus --max-tokens {max_tokens} exceeds the "
                         f"{cfg.model.max_seq_len} positions this model has learned")
    device = next(model.parameters()).device
    prepare(model, cfg, device, "inference")
    generator = None
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    out = out or sys.stdout
    out.write(prompt)
    out.flush()
    # A token may end inside a multi-byte character; the incremental decoder holds such bytes back.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = []
    for token in generate(model, torch.tensor([tokens], device=device), max_tokens, final_window(cfg), temperature,
                          top_k, generator):
        generated.append(token)
        if token == EOT:
            break
        out.write(text.decode(gpt2().decode_single_token_bytes(token)))
        out.flush()
    out.write(text.decode(b"", final=True) + "\n")
    return generated


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained model",
                       description="Generate text from the newest checkpoint of a run (or a given checkpoint or "
                                   "export folder), streaming it to the terminal. The prompt starts a document "
                                   "(<|endoftext|> is put before it); generation stops at the document's end or "
                                   "after --max-tokens.")
    p.add_argument("path", metavar="RUN_DIR|CKPT", help="a run directory (its newest checkpoint), a checkpoint "
                                                        "directory or a folder written by `speedrun export`")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a fresh document)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample from the K most likely tokens (default 200; 0: all)")
    p.add_argument("--seed", type=int, help="seed the sampling, to repeat a generation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args: argparse.Namespace) -> int:
    sample(args.path, args.prompt, args.max_tokens, args.temperature, args.top_k or None, args.seed, args.device)
    return 0
