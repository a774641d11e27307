"""The BOS-aligned loader (the 2026 record's packing): sequences packed from documents cut to
max_doc_len, with a step shape that may change from step to step."""

import json

import numpy as np
import pytest
import torch

from speedrun.data import shards
from speedrun.data.loader import TrainLoader
from speedrun.data.tokenizer import EOT
from speedrun.errors import DataError, UsageError

# (seq_len, batch_tokens, max_doc_len) per step: 8 sequences per step, the shape changing after step 3
SCHEDULE = [(64, 512, 20)] * 3 + [(128, 1024, 48)] * 5
LAYOUTS = [(1, 8), (1, 1), (2, 4), (2, 1), (4, 2), (4, 1)]  # (world size, micro-batch sequences)
SHARD_SIZES = [6000, 4000, 8000]


def coded_stream(rng, start: int, n: int) -> np.ndarray:
    """Documents of 1 to 90 tokens, each starting with EOT; every other token is its global position
    + 1 (< EOT), so each token names the one place it came from."""
    tokens = (start + 1 + np.arange(n)).astype(np.uint16)
    tokens[0] = 7  # a shard need not start with a document: these tokens are never used
    pos = int(rng.integers(1, 30))
    while pos < n:
        tokens[pos] = EOT
        pos += int(rng.integers(1, 91))
    return tokens


@pytest.fixture
def doc_files(tmp_path):
    rng = np.random.default_rng(11)
    starts = np.cumsum([0] + SHARD_SIZES)
    assert starts[-1] < EOT
    return [shards.write_shard(tmp_path / f"d_train_{i:06d}.bin", coded_stream(rng, int(starts[i]), n))
            for i, n in enumerate(SHARD_SIZES)]


def streams(files):
    return [np.asarray(shards.read_shard(f), dtype=np.int64) for f in files]


def make(files, world_size=1, micro=8, **kw):
    seq_len, batch_tokens, max_doc_len = SCHEDULE[0]
    kw = {"bos_aligned": True, "shard_boundary": "batch", "max_doc_len": max_doc_len, **kw}
    return [TrainLoader(files, seq_len=seq_len, micro_batch_seqs=micro, batch_tokens=batch_tokens, rank=r,
                        world_size=world_size, **kw) for r in range(world_size)]


def rows(inputs, targets):
    """The seq_len + 1 tokens each (inputs, targets) pair was cut from."""
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1].to(torch.int32))
    return torch.cat([inputs, targets[:, -1:].to(torch.int32)], dim=1)


def global_batches(group, schedule):
    """Per step of `schedule`, every sequence the ranks of `group` saw, ordered by (micro-step, rank)."""
    out = []
    for shape in schedule:
        per_rank = [loader.next_batch(*shape) for loader in group]
        ordered = [rows(*per_rank[r][a]) for a in range(len(per_rank[0])) for r in range(len(group))]
        out.append(torch.cat(ordered).numpy())
    return out


def record_reference(streams, schedule, boundary="batch"):
    """The record's rule, written plainly, over epoch 0: for each sequence, pieces are appended
    while it holds <= T tokens; a piece starting at BOS b_i ends at min(b_{i+1} or the shard's end,
    b_i + max_doc_len, b_i + T + 1 - its length so far), then the cursor moves to document i + 1.
    A sequence that needs a BOS the shard lacks moves to the next shard: with "batch" the whole
    step does."""
    shard, doc, out = 0, 0, []
    for seq_len, batch_tokens, max_doc_len in schedule:
        batch = []
        while len(batch) < batch_tokens // seq_len:
            tokens = streams[shard]
            bos = list(np.flatnonzero(tokens == EOT))
            row, i = [], doc
            while len(row) <= seq_len and i < len(bos):
                start = bos[i]
                i += 1
                end = min(bos[i] if i < len(bos) else len(tokens), start + (max_doc_len or len(tokens)),
                          start + seq_len + 1 - len(row))
                row += list(tokens[start:end])
            if len(row) == seq_len + 1:
                batch.append(row)
                doc = i
                continue
            if boundary == "batch" and batch:
                batch, doc = [], 0  # the step restarts whole in the next shard
            shard, doc = shard + 1, 0
        out.append(np.array(batch))
    return out


def pieces(row: np.ndarray) -> list[np.ndarray]:
    return np.split(row, np.flatnonzero(row == EOT)[1:])


def ten_token_documents(tmp_path, name, count, first):
    """`count` documents of 10 tokens; token k of document d is first + 10·d + k (its BOS aside)."""
    tokens = (first + np.arange(10 * count)).astype(np.uint16)
    tokens[::10] = EOT
    return shards.write_shard(tmp_path / name, tokens)


@pytest.mark.parametrize("boundary", ["batch", "sequence"])
def test_sequences_are_documents_cut_by_the_record_rule(doc_files, boundary):
    data = streams(doc_files)
    got = global_batches(make(doc_files, shard_boundary=boundary), SCHEDULE)
    reference = record_reference(data, SCHEDULE, boundary)
    assert [b.shape for b in got] == [(8, 65)] * 3 + [(8, 129)] * 5
    assert all(np.array_equal(a, b) for a, b in zip(got, reference))
    assert got[-1][got[-1] != EOT].max() > SHARD_SIZES[0] + 1  # the steps reached the second shard

    bos = [np.flatnonzero(s == EOT) for s in data]
    starts = np.cumsum([0] + SHARD_SIZES)
    used = []  # (shard, document) of every piece placed, in stream order
    cut_short = 0
    for (seq_len, _, max_doc_len), batch in zip(SCHEDULE, got):
        for row in batch:
            assert row[0] == EOT and row.size == seq_len + 1
            for piece in pieces(row):
                assert piece.size <= max_doc_len
                if piece.size == 1:
                    continue  # a lone BOS does not say where it came from
                where = piece[1] - 2  # the global position of the piece's BOS
                shard = int(np.searchsorted(starts, where, side="right")) - 1
                local = where - starts[shard]
                doc = int(np.searchsorted(bos[shard], local))
                assert bos[shard][doc] == local
                assert np.array_equal(piece, data[shard][local:local + piece.size])  # a prefix of the document
                cut_short += piece.size < np.diff(bos[shard], append=SHARD_SIZES[shard])[doc]
                used.append((shard, doc))
    assert used == sorted(set(used))  # document order, none twice
    assert cut_short > len(got)  # max_doc_len and the sequence ends did cut documents


def test_global_batch_is_the_same_for_any_world_size_and_accumulation(doc_files):
    schedule = SCHEDULE * 3  # several epochs, with shape changes inside them
    reference = global_batches(make(doc_files, seed=3), schedule)
    for world_size, micro in LAYOUTS[1:]:
        group = make(doc_files, world_size, micro, seed=3)
        got = global_batches(group, schedule)
        assert all(np.array_equal(a, b) for a, b in zip(reference, got)), (world_size, micro)
    assert group[0].epoch >= 2
    for batch in reference:
        assert (batch[:, 0] == EOT).all()


def test_later_epochs_start_at_the_first_document_after_an_offset_drawn_from_the_seed(tmp_path):
    files = [ten_token_documents(tmp_path, "e_train_000000.bin", 200, 0)]
    stream = streams(files)[0]
    firsts = set()
    for seed in range(4):
        (loader,) = make(files, seed=seed)
        while loader.epoch == 0:
            (batch,) = global_batches([loader], [SCHEDULE[0]])
        offset = loader._epoch_plan(1)[1]
        assert 0 <= offset < SCHEDULE[0][0]
        start = -(-offset // 10) * 10  # the first document at or after the offset
        assert np.array_equal(batch[0][:10], stream[start:start + 10])
        firsts.add(start)
    assert len(firsts) > 1


@pytest.mark.parametrize("boundary", ["batch", "sequence"])
def test_state_resumes_exactly_under_another_world_size(doc_files, boundary):
    schedule = SCHEDULE * 2
    (original,) = make(doc_files, shard_boundary=boundary, seed=5)
    global_batches([original], schedule[:2])
    state = json.loads(json.dumps(original.state_dict()))
    assert state["version"] == 2 and state["position"] > 0 and state["max_doc_len"] == 20
    expected = global_batches([original], schedule[2:])  # a shape change, shard boundaries and an epoch
    assert original.epoch >= 1
    for world_size, micro in [(1, 8), (2, 2), (4, 1)]:
        resumed = make(doc_files, world_size, micro, shard_boundary=boundary, seed=5)
        for loader in resumed:
            loader.load_state_dict(state)
        assert all(np.array_equal(a, b) for a, b in zip(expected, global_batches(resumed, schedule[2:])))


def test_a_step_that_does_not_fit_the_rest_of_a_shard_comes_whole_from_the_next(tmp_path):
    files = [ten_token_documents(tmp_path, "t_train_000000.bin", 7, 0),
             ten_token_documents(tmp_path, "t_train_000001.bin", 7, 1000)]
    # seq_len 16: a sequence is one document and 7 tokens of the next; after step 1, shard 0 holds
    # one sequence (documents 4 and 5) and document 6, which cannot be completed
    batches = {}
    for boundary in ("batch", "sequence"):
        loader = TrainLoader(files, seq_len=16, micro_batch_seqs=2, batch_tokens=32, bos_aligned=True,
                             shard_boundary=boundary)
        batches[boundary] = global_batches([loader], [(16, 32, 0)] * 2)
        assert loader.epoch == 0
    first = np.concatenate([[EOT], np.arange(1, 10), [EOT], np.arange(11, 17)])  # documents 0 and 1 of shard 0
    for boundary, steps in batches.items():
        assert np.array_equal(steps[0][0], first) and np.array_equal(steps[0][1], first + 20 - (first == EOT) * 20)
    # batch: step 2 is shard 1's documents 0..3, the rest of shard 0 skipped
    assert np.array_equal(batches["batch"][1][0], first + 1000 - (first == EOT) * 1000)
    assert np.array_equal(batches["batch"][1][1], first + 1020 - (first == EOT) * 1020)
    # sequence: step 2 takes shard 0's last whole sequence, then shard 1's first
    assert np.array_equal(batches["sequence"][1][0], first + 40 - (first == EOT) * 40)
    assert np.array_equal(batches["sequence"][1][1], first + 1000 - (first == EOT) * 1000)


def test_shards_too_small_for_the_batch_are_an_error_naming_the_shard(tmp_path, doc_files):
    small = ten_token_documents(tmp_path, "s_train_000000.bin", 12, 0)  # 120 tokens, 12 documents
    (loader,) = make([small])
    with pytest.raises(DataError, match=r"no train shard holds a batch of 8 sequences of 65 tokens packed from "
                                        r"documents cut to 20 tokens \(the largest, .*s_train_000000\.bin"):
        loader.next_batch()
    # fits at first, then a later step asks for more than any shard holds
    (loader,) = make(doc_files)
    loader.next_batch()
    with pytest.raises(DataError, match=r"holds a batch of 64 sequences.*d_train_000002\.bin, has 8,000 tokens"):
        loader.next_batch(seq_len=128, batch_tokens=64 * 128)
    (loader,) = make([small], shard_boundary="sequence")
    with pytest.raises(DataError, match="no train shard holds a sequence of 257 tokens starting at a document"):
        loader.next_batch(seq_len=256, batch_tokens=8 * 256, max_doc_len=0)


def test_state_of_another_max_doc_len_or_an_old_version_is_refused(doc_files):
    (loader,) = make(doc_files)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(UsageError, match="saved with max_doc_len = 20, this run has 48"):
        make(doc_files, max_doc_len=48)[0].load_state_dict(state)
    with pytest.raises(UsageError, match="bos_aligned = True, this run has False"):
        make(doc_files, bos_aligned=False, max_doc_len=0)[0].load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("position", "max_doc_len")}
    old.update(version=1, sequence=4)
    with pytest.raises(DataError, match="BOS-aligned loader of state version 1"):
        make(doc_files, max_doc_len=0)[0].load_state_dict(old)


def test_bad_shapes_are_refused(doc_files):
    with pytest.raises(UsageError, match="data.bos_aligned"):
        TrainLoader(doc_files, seq_len=64, micro_batch_seqs=1, batch_tokens=64, max_doc_len=20)
    (flat,) = make(doc_files, bos_aligned=False, max_doc_len=0)
    with pytest.raises(UsageError, match="data.bos_aligned"):
        flat.next_batch(max_doc_len=20)
    (loader,) = make(doc_files, micro=2)
    with pytest.raises(UsageError, match="not divisible"):
        loader.next_batch(seq_len=64, batch_tokens=64 * 3)
    with pytest.raises(UsageError, match="max_doc_len"):
        loader.next_batch(max_doc_len=-1)
    assert loader.step == 0 and loader.state_dict()["position"] == 0  # a refused shape takes nothing
