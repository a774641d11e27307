"""`speedrun data`: get, make and check token shards."""

from __future__ import annotations

import argparse

from speedrun.data import encode, fineweb


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="download, tokenize and inspect token shards",
                                   description="Download, tokenize and inspect token shards.")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = actions.add_parser("fineweb", help="download pre-tokenized FineWeb shards from the Hugging Face hub",
                           description="Download the GPT-2-tokenized FineWeb shards the speedrun record trains on "
                                       "(100M tokens each). Complete files are skipped; an interrupted download resumes.")
    p.add_argument("--dataset", choices=list(fineweb.DATASETS), default=fineweb.DEFAULT_DATASET)
    p.add_argument("--train-shards", type=int, default=fineweb.DEFAULT_TRAIN_SHARDS, metavar="N",
                   help=f"train shards to fetch besides the val shard (default {fineweb.DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--dir", default=None, metavar="DIR", help="where to put them (default data/<dataset>)")
    p.add_argument("--revision", default="main", help="hub branch, tag or commit (default main)")
    p.set_defaults(func=_fineweb)

    p = actions.add_parser("tokenize", help="turn text, JSONL or parquet files into GPT-2 token shards",
                           description="Tokenize documents with GPT-2 into <prefix>_val_000000.bin and "
                                       "<prefix>_train_NNNNNN.bin. A .jsonl/.ndjson file holds one JSON object with "
                                       "a 'text' field per line, a .parquet file a 'text' column; any other file is "
                                       "one plain-text document (or several, with --blank-line-docs).")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--val-tokens", type=int, default=encode.DEFAULT_VAL_TOKENS, metavar="N",
                   help=f"tokens at the start that form the val shard (default {encode.DEFAULT_VAL_TOKENS:,}; 0: none)")
    p.add_argument("--shard-tokens", type=int, default=encode.DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per train shard (default {encode.DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: CPU count)")
    p.add_argument("--blank-line-docs", action="store_true",
                   help="in plain-text files, blank lines separate documents")
    p.add_argument("--prefix", default="data", metavar="NAME", help="shard file name prefix (default data)")
    p.set_defaults(func=_tokenize)

    p = actions.add_parser("inspect", help="check shards and show what they hold",
                           description="Check each shard's header, length and token ids, and print its token count, "
                                       "document count (<|endoftext|> tokens) and the start of its first document.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_inspect)

    p = actions.add_parser("builtin", help="build (if needed) and locate the built-in corpus",
                           description="Print the folder of the built-in corpus (Python's own documentation), "
                                       "tokenizing it first if this machine has not yet.")
    p.set_defaults(func=_builtin)


def _fineweb(args: argparse.Namespace) -> int:
    files = fineweb.download_fineweb(args.dataset, args.train_shards, args.dir, revision=args.revision)
    print(f"{len(files)} shards ready in {files[0].parent}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    written = encode.tokenize_files(args.inputs, args.out, val_tokens=args.val_tokens, shard_tokens=args.shard_tokens,
                                    workers=args.workers, blank_line_docs=args.blank_line_docs, prefix=args.prefix)
    for path, count in written:
        print(f"{path}  {count:,} tokens")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from speedrun.data import shards, tokenizer

    shown_tokens, shown_chars = 512, 300
    for name in args.files:
        tokens = shards.read_shard(name, vocab_size=tokenizer.VOCAB_SIZE)
        docs = int(np.count_nonzero(tokens == tokenizer.EOT))
        # The first document the shard holds (or the tail of one cut at its start), up to its end.
        start = 1 if tokens.size and tokens[0] == tokenizer.EOT else 0
        head = tokens[start:start + shown_tokens]
        ends = np.flatnonzero(head == tokenizer.EOT)
        text = tokenizer.decode(head[:int(ends[0])] if ends.size else head)
        cut = len(text) > shown_chars or (not ends.size and tokens.size > start + shown_tokens)
        print(name)
        print(f"  tokens     {tokens.size:,}")
        print(f"  documents  {docs:,}")
        print(f"  text       {text[:shown_chars]!r}{' ...' if cut else ''}")
    return 0


def _builtin(args: argparse.Namespace) -> int:
    import json

    from speedrun.data import corpus

    folder = corpus.builtin_corpus_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    print(folder)
    print(f"  {manifest['documents']:,} documents, {manifest['train_tokens']:,} train and "
          f"{manifest['val_tokens']:,} val tokens; {manifest['license']}")
    return 0
