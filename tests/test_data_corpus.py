import json
import os
import subprocess
import sys

import numpy as np
import pytest

from speedrun.data import corpus, shards
from speedrun.data.loader import find_shards, val_batches
from speedrun.data.tokenizer import EOT, decode


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SPEEDRUN_CACHE")
    os.environ["SPEEDRUN_CACHE"] = str(root)
    try:
        yield corpus.builtin_corpus_dir()
    finally:
        if old is None:
            del os.environ["SPEEDRUN_CACHE"]
        else:
            os.environ["SPEEDRUN_CACHE"] = old


def test_builtin_corpus_is_cached_shards_with_a_whole_document_val_split(built):
    assert built.parent == corpus.cache_root() and built.name == corpus.corpus_name()
    train, val = find_shards(built, "*_train_*.bin", "*_val_*.bin")
    assert [p.name for p in train] == ["builtin_train_000000.bin"]
    assert [p.name for p in val] == ["builtin_val_000000.bin"]
    train_tokens, val_tokens = shards.read_shard(train[0], 50257), shards.read_shard(val[0], 50257)
    assert train_tokens[0] == EOT and val_tokens[0] == EOT  # both splits begin at a document
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["val_tokens"] == val_tokens.size >= 32769
    assert 0.04 < val_tokens.size / (val_tokens.size + train_tokens.size) < 0.1
    assert train_tokens.size + val_tokens.size > 500_000
    assert manifest["val_documents"] and manifest["documents"] == int(np.count_nonzero(train_tokens == EOT)) + \
        int(np.count_nonzero(val_tokens == EOT))
    assert "Python" in decode(train_tokens[:20000])
    assert len(list(val_batches(val, val_tokens=32768, seq_len=1024))) == 32  # twice the tiny preset's val set fits
    assert corpus.builtin_corpus_dir() == built  # found, not rebuilt


def test_rebuild_gives_identical_shards(built, tmp_path):
    corpus.build(tmp_path)
    for name in ("builtin_train_000000.bin", "builtin_val_000000.bin", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes()


def test_documents_come_from_the_three_documented_sources():
    names = [name for name, _ in corpus.corpus_documents()]
    assert len(names) == len(set(names))
    assert "pydoc_data.topics/assert" in names and "json.encoder" in names and "c:builtins" in names
    assert not [n for n in names if n.startswith(("test.", "tkinter", "idlelib", "lib2to3", "distutils"))]


@pytest.mark.slow
def test_racing_processes_share_one_build(tmp_path):
    code = "from speedrun.data.corpus import builtin_corpus_dir; print(builtin_corpus_dir())"
    env = dict(os.environ, SPEEDRUN_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [corpus.corpus_name()]  # no staging folder left over
