import json
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speedrun.data.encode import tokenize_files
from speedrun.data.tokenizer import EOT, gpt2
from speedrun.errors import DataError, UsageError

TEXT = "A plain text file is one document.\n\nEven with blank lines in it.\n"
JSONL = ["First JSON document.", "Second JSON document, a little longer than the first one."]
PARQUET = ["Parquet row one.", "Parquet row two has more words in it than row one."]


def speedrun(*args):
    return subprocess.run([sys.executable, "-m", "speedrun", *args], capture_output=True, text=True, timeout=120)


def independent_read(path):
    raw = path.read_bytes()
    magic, version, count = struct.unpack("<3i", raw[:12])
    assert (magic, version, len(raw)) == (20240520, 1, 1024 + 2 * count)
    return list(struct.unpack(f"<{count}H", raw[1024:]))


@pytest.fixture
def inputs(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(TEXT)
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(JSONL)) + "\n")
    c = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": PARQUET}), c)
    return [a, b, c]


def expected_stream(docs):
    enc = gpt2()
    return [t for doc in docs for t in [EOT] + enc.encode_ordinary(doc)]


def read_all(out, prefix):
    return {p.name: p.read_bytes() for p in sorted(out.glob(f"{prefix}_*.bin"))}


def test_cli_tokenizes_text_jsonl_and_parquet_reproducibly(tmp_path, inputs):
    out = tmp_path / "d"
    args = ["data", "tokenize", *map(str, inputs), "--out", str(out), "--val-tokens", "10", "--shard-tokens", "16",
            "--prefix", "mix"]
    result = speedrun(*args)
    assert result.returncode == 0, result.stderr
    stream = expected_stream([TEXT, *JSONL, *PARQUET])
    files = sorted(out.glob("mix_*.bin"))
    names = [p.name for p in files]
    train = [n for n in names if "_train_" in n]
    assert "mix_val_000000.bin" in names and train == [f"mix_train_{i:06d}.bin" for i in range(len(train))]
    assert independent_read(out / "mix_val_000000.bin") == stream[:10]
    assert sum((independent_read(out / n) for n in train), []) == stream[10:]
    assert all(len(independent_read(out / n)) == 16 for n in train[:-1])
    assert str(out / "mix_val_000000.bin") in result.stdout

    first = read_all(out, "mix")
    assert speedrun(*args).returncode == 0
    assert read_all(out, "mix") == first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_output_does_not_depend_on_worker_count(tmp_path, inputs):
    many = [tmp_path / f"doc{i}.txt" for i in range(300)]
    for i, path in enumerate(many):
        path.write_text(f"Document number {i} says something slightly different. " * (i % 7 + 1))
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_files([*inputs, *many], out, val_tokens=500, shard_tokens=2000, workers=workers, progress=False)
        runs.append(read_all(out, "data"))
    assert runs[0] == runs[1] and len(runs[0]) > 3


def test_blank_line_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one\n\ntwo\n  \nthree\r\n\r\n\n")
    tokenize_files([path], tmp_path / "d", val_tokens=2, workers=1, blank_line_docs=True, progress=False)
    tokens = independent_read(tmp_path / "d" / "data_val_000000.bin") + \
        independent_read(tmp_path / "d" / "data_train_000000.bin")
    assert tokens == expected_stream(["one", "two", "three"])


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path, inputs):
    out = tmp_path / "d"
    tokenize_files(inputs, out, val_tokens=10, shard_tokens=8, workers=1, progress=False)
    assert (out / "data_train_000005.bin").exists()
    tokenize_files(inputs, out, val_tokens=10, shard_tokens=1000, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["data_train_000000.bin", "data_val_000000.bin"]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_name_the_file_and_write_nothing(tmp_path, inputs, workers):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad_parquet)
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "fine"}\n{"text": \n')
    cases = [
        ([tmp_path / "missing.txt"], f"{tmp_path / 'missing.txt'}: no such file"),
        ([*inputs, bad_jsonl], f"{bad_jsonl}:2: no 'text' field"),
        ([*inputs, not_json], f"{not_json}:2: not valid JSON"),
        ([*inputs, bad_parquet], f"{bad_parquet}: no 'text' column (columns: body)"),
        ([inputs[0]], f"the inputs hold only {len(expected_stream([TEXT]))} tokens, not more than --val-tokens 10,485,760"),
    ]
    out = tmp_path / "d"
    out.mkdir()
    for paths, message in cases:
        with pytest.raises(DataError) as caught:
            tokenize_files(paths, out, workers=workers, shard_tokens=4, progress=False)
        assert str(caught.value).startswith(message)
        assert list(out.iterdir()) == []



def test_an_output_folder_that_cannot_be_made_is_one_line_and_a_failed_run_leaves_none(tmp_path, inputs):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [(afile, f"--out {afile}: exists and is not a folder"),
                         (afile / "d", f"--out {afile / 'd'}: {afile} is a file, not a folder")]:
        with pytest.raises(UsageError) as caught:
            tokenize_files(inputs, out, val_tokens=10, workers=1, progress=False)
        assert str(caught.value) == message and afile.read_text() == "x"
    with pytest.raises(DataError, match="nothing would be left for training"):
        tokenize_files(inputs, tmp_path / "new" / "d", workers=1, progress=False)
    assert list((tmp_path / "new").iterdir()) == []

def test_cli_bad_input_exits_1_with_one_line(tmp_path, inputs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n[1, 2]\n')
    result = speedrun("data", "tokenize", *map(str, inputs), str(bad), "--out", str(tmp_path / "d"), "--val-tokens", "4")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"speedrun data: error: {bad}:3: no 'text' field"]
    assert not list((tmp_path / "d").glob("*.bin"))
