"""`speedrun eval`: HellaSwag accuracy checked against losses computed here ending by ending with the
model's plain forward pass; the shard loss checked against the run's own final val_loss and bits per
byte against the decoded bytes; the data download converted and cached; failures as one line."""

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from speedrun import evaluate
from speedrun.data import shards
from speedrun.data.corpus import builtin_corpus_dir
from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import DataError, UsageError
from speedrun.loading import final_window, load_model
from test_export import trained_run

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def by_hand(model, window, item):
    """(sum, mean) per ending of its tokens' cross-entropy, each ending in a forward pass of its own,
    unpadded."""
    enc = gpt2()
    context = [EOT] + enc.encode_ordinary(item["ctx"])
    sums, means = [], []
    for ending in item["endings"]:
        tokens = torch.tensor([context + enc.encode_ordinary(" " + ending)])
        with torch.no_grad():
            logits = model(tokens[:, :-1], **window.kwargs())
        ce = F.cross_entropy(logits[0, len(context) - 1:], tokens[0, len(context):], reduction="none")
        sums.append(ce.sum().item())
        means.append(ce.mean().item())
    return np.array(sums), np.array(means)


def test_hellaswag_accuracy_equals_hand_computation(run):
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    cfg, model = load_model(run, "cpu")
    right = []
    for item in items:
        sums, means = by_hand(model, final_window(cfg), item)
        batched = evaluate.ending_losses(model, item["ctx"], item["endings"], final_window(cfg))
        np.testing.assert_allclose(np.stack([t.numpy() for t in batched]), np.stack([sums, means]), rtol=1e-5)
        right.append((means.argmin() == item["label"], sums.argmin() == item["label"]))
    right = np.array(right, dtype=float)

    r = run_cli("eval", "hellaswag", str(run), "--data", str(FIXTURE), "--json")
    result = json.loads(r.stdout)
    assert result["items"] == 6
    assert (result["acc_norm"], result["acc"]) == pytest.approx(tuple(right.mean(0)))
    limited = evaluate.hellaswag(str(run), str(FIXTURE), limit=4, device="cpu")
    assert limited["items"] == 4
    assert (limited["acc_norm"], limited["acc"]) == pytest.approx(tuple(right[:4].mean(0)))


def test_hellaswag_without_network_or_cache_fails_in_one_line(run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"SPEEDRUN_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    r = run_cli("eval", "hellaswag", str(run), env=env, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"speedrun eval: error: HellaSwag is not cached at {tmp_path / 'cache'}/hellaswag/"
                               f"hellaswag_val.jsonl and cannot be downloaded: cannot reach the Hugging Face hub")
    assert lines[0].endswith("or pass --data FILE (hellaswag_val.jsonl)")


def test_hellaswag_download_is_converted_once_and_cached(tmp_path, monkeypatch):
    """The hub's Parquet copy (labels as strings) becomes the original jsonl schema (integer labels)."""
    import huggingface_hub
    import pyarrow
    from pyarrow import parquet

    import speedrun.data.fineweb

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    fetched = []

    def fake_download(repo_id, filename, *, repo_type, revision, local_dir):
        fetched.append((repo_id, filename, repo_type, revision))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True)
        parquet.write_table(pyarrow.Table.from_pylist([{**row, "label": str(row["label"])} for row in rows]), path)
        return str(path)

    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(speedrun.data.fineweb, "check_reachable", lambda *args: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(evaluate, "HELLASWAG_ITEMS", len(rows))
    path = evaluate.fetch_hellaswag()
    assert path == tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert fetched == [("Rowan/hellaswag", "default/validation/0000.parquet", "dataset", "refs/convert/parquet")]
    assert evaluate.fetch_hellaswag() == path and len(fetched) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["hellaswag_val.jsonl"]


def test_bad_hellaswag_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + '{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a HellaSwag item needs"):
        evaluate.read_hellaswag(bad)
    bad.write_text("not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a HellaSwag item"):
        evaluate.read_hellaswag(bad)


def test_shard_loss_is_the_runs_val_loss_and_bits_per_byte_count_decoded_bytes(run):
    data = builtin_corpus_dir()
    r = run_cli("eval", "loss", str(run), "--data", str(data), "--json")
    result = json.loads(r.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert result["tokens"] == 1024
    # the targets: the val stream's tokens 1..1024; <|endoftext|> separates documents and is no text
    val = shards.read_shard(sorted(data.glob("*_val_*.bin"))[0])
    targets = [int(t) for t in val[1:1025] if t != EOT]
    n_bytes = len(gpt2().decode_bytes(targets))
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * 1024 / math.log(2) / n_bytes, rel=1e-9)


def test_shard_loss_options_and_failures(run, tmp_path):
    result = evaluate.shard_loss(str(run), str(builtin_corpus_dir()), tokens=600, seq_len=200, pattern="*_train_*.bin",
                                 device="cpu")
    assert result["tokens"] == 600 and result["shards"][0].endswith("_train_000000.bin")
    (tmp_path / "empty").mkdir()
    r = run_cli("eval", "loss", str(run), "--data", str(tmp_path / "empty"), check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == f"speedrun eval: error: no shards matching '*_val_*.bin' in {tmp_path / 'empty'}"
    with pytest.raises(DataError, match="does not exist"):
        evaluate.shard_loss(str(run), str(tmp_path / "missing"), device="cpu")
    # a zero is refused, not read as "the run's value"
    for options, message in [(dict(tokens=0), "--tokens must be positive, got 0"),
                             (dict(seq_len=-5), "--seq-len must be positive, got -5"),
                             (dict(tokens=100, seq_len=200), "100 tokens hold no whole sequence of 200 (--tokens, --seq-len)")]:
        with pytest.raises(UsageError) as caught:
            evaluate.shard_loss(str(run), str(builtin_corpus_dir()), device="cpu", **options)
        assert str(caught.value) == message
