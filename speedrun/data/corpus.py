"""The built-in corpus: human-written English that every Python installation carries, so a tiny run
needs no download. It is, in this order of sources:

1. `pydoc_data.topics` — the Python Language Reference and Library topics that `help()` shows;
2. the docstrings of the standard library's own Python modules, read from their source with `ast`
   (nothing is imported), in source order, one document per module;
3. the docstrings of a fixed list of the standard library's C modules (builtins, math, itertools, ...).

All of it is CPython's documentation, under the PSF License Agreement. Packages that distributions
split off (tkinter, idlelib, lib2to3, distutils, ensurepip, venv, turtle) and the test suite are left
out, so two machines with the same Python version build the same corpus. It is tokenized once into a
cache folder; documents are ordered by a hash of their name, and the first of them (at least
`VAL_MIN_TOKENS` tokens and `VAL_FRACTION` of the corpus) form the validation shard."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from speedrun.data import shards, tokenizer

CORPUS_VERSION = 1  # bump when the recipe below changes, so caches built by older code are not reused
PREFIX = "builtin"
VAL_FRACTION = 0.05
# 32,768 val tokens plus the one extra target token: twice the tiny presets' data.val_tokens (16,384).
# On the built-in corpus this floor, not VAL_FRACTION, sets the val shard: changing it changes the shard.
VAL_MIN_TOKENS = 32768 + 1

_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
              "venv", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "lib-dynload"}
_SKIP_FILES = {"turtle.py", "sitecustomize.py", "usercustomize.py", "this.py"}  # this.py is rot13
C_MODULES = ("builtins", "math", "cmath", "itertools", "gc", "array", "binascii", "unicodedata", "zlib", "_io",
             "_collections", "_functools", "_operator", "_struct", "_datetime", "_decimal", "_random", "_heapq",
             "_bisect", "_json", "_pickle", "_csv", "_sre", "_thread", "_codecs", "_abc", "_weakref")


def cache_root() -> Path:
    return Path(os.environ.get("SPEEDRUN_CACHE") or Path.home() / ".cache" / "speedrun")


def corpus_name() -> str:
    major, minor, micro = sys.version_info[:3]
    return f"{PREFIX}-py{major}.{minor}.{micro}-v{CORPUS_VERSION}"


def _topic_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics/{key}", topics[key].strip()) for key in sorted(topics)]


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(os.__file__).parent
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(files):
            if not name.endswith(".py") or name in _SKIP_FILES or name.startswith("_sysconfigdata"):
                continue
            rel = (Path(folder) / name).relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found.append((".".join(parts), Path(folder) / name))
    return found


def _source_docstrings(module: str, tree: ast.Module) -> list[str]:
    parts = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{scope}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and doc.strip():
                    parts.append(f"{name}\n\n{doc.strip()}")
                visit(child, name)
            else:
                visit(child, scope)

    doc = ast.get_docstring(tree)
    if doc and doc.strip():
        parts.append(doc.strip())
    visit(tree, module)
    return parts


def _stdlib_documents() -> list[tuple[str, str]]:
    docs = []
    for module, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a file this Python cannot parse documents nothing it runs
        parts = _source_docstrings(module, tree)
        if parts:
            docs.append((module, f"{module}\n\n" + "\n\n".join(parts)))
    return docs


def _c_module_documents() -> list[tuple[str, str]]:
    docs, seen = [], set()

    def collect(obj, name: str, parts: list[str], depth: int) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            parts.append(f"{name}\n\n{inspect.cleandoc(doc)}" if depth else inspect.cleandoc(doc))
        if depth >= 2 or not (inspect.ismodule(obj) or inspect.isclass(obj)):
            return
        for key, value in sorted(vars(obj).items()):
            documented = inspect.isclass(value) or inspect.isroutine(value) or inspect.isdatadescriptor(value)
            if key.startswith("_") or not documented or id(value) in seen:
                continue
            seen.add(id(value))
            collect(value, f"{name}.{key}", parts, depth + 1)

    for module_name in C_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        parts = []
        collect(module, module_name, parts, 0)
        if parts:
            docs.append((module_name, f"{module_name}\n\n" + "\n\n".join(parts)))
    return docs


def corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in source order; names are unique."""
    return _topic_documents() + _stdlib_documents() + [(f"c:{n}", t) for n, t in _c_module_documents()]


def _order_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def build(dest: Path) -> dict:
    """Tokenize the corpus into shards under `dest`; returns the manifest also written there."""
    docs = sorted(corpus_documents(), key=lambda d: _order_key(d[0]))
    encoded = [tokenizer.encode_documents([text]) for _, text in docs]
    total = sum(t.size for t in encoded)
    val_target = max(VAL_MIN_TOKENS, int(VAL_FRACTION * total))
    val_count, val_tokens = 0, 0
    while val_tokens < val_target:
        val_tokens += encoded[val_count].size
        val_count += 1
    dest.mkdir(parents=True, exist_ok=True)
    shards.write_shard(dest / f"{PREFIX}_val_{0:06d}.bin", np.concatenate(encoded[:val_count]))
    shards.write_shard(dest / f"{PREFIX}_train_{0:06d}.bin", np.concatenate(encoded[val_count:]))
    manifest = {
        "corpus": corpus_name(),
        "python": sys.version.split()[0],
        "sources": ["pydoc_data.topics", "standard library docstrings (ast)", "C module docstrings"],
        "license": "PSF License Agreement (CPython documentation)",
        "documents": len(docs),
        "tokens": total,
        "val_documents": [name for name, _ in docs[:val_count]],
        "val_tokens": val_tokens,
        "train_tokens": total - val_tokens,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def builtin_corpus_dir() -> Path:
    """The folder of the built-in corpus shards, built on first use. It is built in a private temporary
    folder and renamed into place, so a reader never sees a half-built corpus and processes that race
    to build it (every rank of a first torchrun) all end up with the one that won."""
    final = cache_root() / corpus_name()
    if (final / "manifest.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        build(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
