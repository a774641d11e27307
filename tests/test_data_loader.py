import json

import numpy as np
import pytest
import torch

from speedrun.data import shards
from speedrun.data.loader import TrainLoader, find_shards, val_batches
from speedrun.data.tokenizer import EOT
from speedrun.errors import DataError, UsageError

SEQ = 16
BATCH = SEQ * 8  # 8 sequences per step
LAYOUTS = [(1, 8), (1, 1), (1, 2), (2, 1), (2, 4), (4, 1), (4, 2), (8, 1)]  # (world size, micro-batch sequences)


def make_stream(rng, n: int) -> np.ndarray:
    """Tokens < 1000 in documents of 1 to 24 tokens, each starting with EOT."""
    tokens = rng.integers(0, 1000, n).astype(np.uint16)
    pos = 0
    while pos < n:
        tokens[pos] = EOT
        pos += int(rng.integers(1, 25))
    return tokens


@pytest.fixture
def train_files(tmp_path):
    rng = np.random.default_rng(7)
    files = []
    for i, n in enumerate([200, 130, 301]):
        files.append(shards.write_shard(tmp_path / f"x_train_{i:06d}.bin", make_stream(rng, n)))
    return files


def loaders(files, world_size, micro, **kw):
    return [TrainLoader(files, seq_len=SEQ, micro_batch_seqs=micro, batch_tokens=BATCH, rank=r, world_size=world_size, **kw)
            for r in range(world_size)]


def rows(inputs, targets):
    """The seq_len + 1 tokens each (inputs, targets) pair was cut from."""
    assert torch.equal(inputs[:, 1:], targets[:, :-1].to(torch.int32))
    return torch.cat([inputs, targets[:, -1:].to(torch.int32)], dim=1)


def global_batches(group, steps):
    """Per step, every sequence the ranks of `group` saw, ordered by (micro-step, rank). `steps`: a
    count of steps of the loaders' own shape, or each step's next_batch arguments."""
    out = []
    for shape in [()] * steps if isinstance(steps, int) else steps:
        per_rank = [loader.next_batch(*shape) for loader in group]
        ordered = [rows(*per_rank[r][a]) for a in range(len(per_rank[0])) for r in range(len(group))]
        out.append(torch.cat(ordered))
    return out


@pytest.mark.parametrize("boundary", ["sequence", "batch"])
@pytest.mark.parametrize("bos_aligned", [False, True])
def test_global_batch_is_the_same_for_any_world_size_and_accumulation(train_files, bos_aligned, boundary):
    steps = 14  # several epochs of this small stream
    kw = dict(bos_aligned=bos_aligned, seed=3, shard_boundary=boundary)
    reference = global_batches(loaders(train_files, 1, 8, **kw), steps)
    assert all(b.shape == (8, SEQ + 1) for b in reference)
    for world_size, micro in LAYOUTS[1:]:
        group = loaders(train_files, world_size, micro, **kw)
        assert group[0].grad_accum == 8 // (world_size * micro)
        got = global_batches(group, steps)
        assert all(torch.equal(a, b) for a, b in zip(reference, got)), (world_size, micro)
    assert group[0].epoch >= 2


def test_flat_mode_walks_windows_in_order_like_the_record(train_files):
    (loader,) = loaders(train_files, 1, 8)
    first = shards.read_shard(train_files[0]).astype(np.int32)
    batch = global_batches([loader], 1)[0].numpy()
    for k in range(8):
        assert np.array_equal(batch[k], first[k * SEQ:k * SEQ + SEQ + 1])
    # shard 0 holds 12 windows of 17 tokens (200 tokens); the 13th sequence is shard 1's first window
    batch = global_batches([loader], 1)[0].numpy()
    assert np.array_equal(batch[3], first[11 * SEQ:12 * SEQ + 1])
    assert np.array_equal(batch[4], shards.read_shard(train_files[1])[:SEQ + 1])


def test_bos_aligned_sequences_start_at_documents(train_files):
    (loader,) = loaders(train_files, 1, 2, bos_aligned=True)
    streams = [np.asarray(shards.read_shard(f), dtype=np.int32) for f in train_files]
    seen = 0
    for _ in range(10):
        for inputs, targets in loader.next_batch():
            assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
            assert bool((inputs[:, 0] == EOT).all())
            for row in rows(inputs, targets).numpy():
                assert any(np.array_equal(s[i:i + SEQ + 1], row) for s in streams for i in np.flatnonzero(s == EOT))
                seen += 1
    assert seen == 80


@pytest.mark.parametrize("boundary", ["sequence", "batch"])
@pytest.mark.parametrize("bos_aligned", [False, True])
def test_state_restores_the_exact_position_even_under_another_world_size(train_files, bos_aligned, boundary):
    kw = dict(bos_aligned=bos_aligned, seed=5, shard_boundary=boundary)
    (original,) = loaders(train_files, 1, 8, **kw)
    global_batches([original], 6)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["step"] == 6 and state["epoch"] == original.epoch >= 1
    expected = global_batches([original], 6)

    for world_size, micro in [(1, 8), (2, 2), (4, 1)]:
        resumed = loaders(train_files, world_size, micro, **kw)
        for loader in resumed:
            loader.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(expected, global_batches(resumed, 6)))


def test_later_epochs_depend_on_the_seed_and_the_first_does_not(train_files):
    a = global_batches(loaders(train_files, 1, 8, seed=1), 12)
    b = global_batches(loaders(train_files, 1, 8, seed=2), 12)
    c = global_batches(loaders(train_files, 1, 8, seed=1), 12)
    assert torch.equal(a[0], b[0])  # epoch 0 is the record's order for every seed
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_state_from_another_setup_is_refused(train_files):
    (loader,) = loaders(train_files, 1, 8, seed=1)
    state = loader.state_dict()
    with pytest.raises(UsageError, match="seed"):
        loaders(train_files, 1, 8, seed=2)[0].load_state_dict(state)
    with pytest.raises(DataError, match="train shards"):
        loaders(train_files[:2], 1, 8, seed=1)[0].load_state_dict(state)
    with pytest.raises(UsageError, match="shard_boundary = sequence"):
        loaders(train_files, 1, 8, seed=1, shard_boundary="batch")[0].load_state_dict(state)
    with pytest.raises(DataError, match="unknown key 'sequence'"):
        loaders(train_files, 1, 8, seed=1)[0].load_state_dict({**state, "sequence": 0})
    # a version-1 state (the cursor as "sequence") saved before shard_boundary existed was "sequence"
    old = {**{k: v for k, v in state.items() if k not in ("position", "max_doc_len", "shard_boundary")},
           "version": 1, "sequence": 0}
    loaders(train_files, 1, 8, seed=1)[0].load_state_dict(old)
    with pytest.raises(UsageError, match="shard_boundary"):
        loaders(train_files, 1, 8, seed=1, shard_boundary="batch")[0].load_state_dict(old)
    with pytest.raises(DataError, match="has version 3; this speedrun reads versions 1 and 2"):
        loaders(train_files, 1, 8, seed=1)[0].load_state_dict({**state, "version": 3})


def test_bad_layouts_and_too_short_shards(tmp_path, train_files):
    with pytest.raises(UsageError, match="not divisible"):
        TrainLoader(train_files, seq_len=SEQ, micro_batch_seqs=3, batch_tokens=BATCH)
    short = shards.write_shard(tmp_path / "s_train_000000.bin", np.full(SEQ, EOT, dtype=np.uint16))
    with pytest.raises(DataError, match="no train shard holds a sequence of 17 tokens"):
        TrainLoader([short], seq_len=SEQ, micro_batch_seqs=1, batch_tokens=SEQ).next_batch()
    no_docs = shards.write_shard(tmp_path / "n_train_000000.bin", np.ones(100, dtype=np.uint16))
    with pytest.raises(DataError, match="document boundary"):
        TrainLoader([no_docs], seq_len=SEQ, micro_batch_seqs=1, batch_tokens=SEQ, bos_aligned=True).next_batch()
    with pytest.raises(UsageError, match="shard_boundary"):
        TrainLoader(train_files, seq_len=SEQ, micro_batch_seqs=1, batch_tokens=BATCH, shard_boundary="shard")


# -- shard_boundary = "batch": the record's whole-batch rule --------------------------------------

POSITION_SHARDS = [385, 130, 129, 386, 60, 300]  # 385 = 2·BATCH + BATCH + 1: the third batch is skipped


@pytest.fixture
def position_files(tmp_path):
    """Shards whose token at position p of shard i is 1000·i + p, so a row says where it was cut."""
    return [shards.write_shard(tmp_path / f"p_train_{i:06d}.bin", (1000 * i + np.arange(n)).astype(np.uint16))
            for i, n in enumerate(POSITION_SHARDS)]


def record_batches(walk, batch):
    """(shard, pos) of each batch by the record's rule, over `walk`: (shard, start offset) pairs."""
    out = []
    for shard, offset in walk:
        pos = offset
        while True:
            if pos + batch + 1 >= POSITION_SHARDS[shard]:
                break  # the record moves on to the next shard
            out.append((shard, pos))
            pos += batch
    return out


def expected_rows(shard, pos):
    return torch.from_numpy(np.stack([1000 * shard + pos + k * SEQ + np.arange(SEQ + 1) for k in range(8)]))


def test_batch_boundary_follows_the_record_rule_for_any_world_size(position_files):
    steps = 20  # past the end of epoch 0 (8 batches) into epoch 2
    plans = [loaders(position_files, 1, 8, seed=4, shard_boundary="batch")[0]._epoch_plan(e) for e in range(3)]
    walk = [(shard, offset) for order, offset in plans for shard in order]
    reference = record_batches(walk, BATCH)
    assert reference[:8] == [(0, 0), (0, 128), (1, 0), (3, 0), (3, 128), (3, 256), (5, 0), (5, 128)]
    for world_size, micro in [(1, 8), (2, 4), (2, 1), (4, 2), (4, 1)]:
        group = loaders(position_files, world_size, micro, seed=4, shard_boundary="batch")
        got = global_batches(group, steps)
        for step, batch in enumerate(got):
            assert torch.equal(batch, expected_rows(*reference[step])), (world_size, micro, step)
        assert group[0].epoch == 2


def test_sequence_boundary_still_takes_what_the_batch_rule_skips(position_files):
    (loader,) = loaders(position_files, 1, 8)
    got = global_batches([loader], 6)
    assert torch.equal(got[2], expected_rows(0, 256))  # tokens 256..384 of shard 0: exactly BATCH + 1 left
    assert torch.equal(got[4], expected_rows(2, 0))  # shard 2 holds exactly BATCH + 1 tokens
    assert torch.equal(got[5], expected_rows(3, 0))


def test_batch_boundary_resumes_mid_shard_under_another_world_size(position_files):
    (original,) = loaders(position_files, 1, 8, seed=2, shard_boundary="batch")
    global_batches([original], 4)  # the next batch is the second of shard 3
    state = json.loads(json.dumps(original.state_dict()))
    assert state["shard_boundary"] == "batch" and (state["shard"], state["position"]) == (3, 128)
    expected = global_batches([original], 10)
    assert torch.equal(expected[0], expected_rows(3, 128))
    for world_size, micro in [(1, 8), (2, 4), (4, 1)]:
        resumed = loaders(position_files, world_size, micro, seed=2, shard_boundary="batch")
        for loader in resumed:
            loader.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(expected, global_batches(resumed, 10)))


# (seq_len, batch_tokens) per step: the batch-size schedule of a staged run
FLAT_SCHEDULE = [(SEQ, BATCH), (SEQ, BATCH), (2 * SEQ, BATCH), (SEQ // 2, BATCH // 2), (SEQ, 2 * BATCH), (SEQ, BATCH)]


def flat_record_rows(schedule):
    """The record's rule with each step's batch B and seq_len T, over epoch 0: move to the next
    shard while pos + B + 1 >= len(shard); the step is tokens pos .. pos + B in windows of T + 1
    tokens starting every T; pos advances by B."""
    out, shard, pos = [], 0, 0
    for seq_len, batch in schedule:
        while pos + batch + 1 >= POSITION_SHARDS[shard]:
            shard, pos = shard + 1, 0
        windows = [1000 * shard + pos + k * seq_len + np.arange(seq_len + 1) for k in range(batch // seq_len)]
        out.append(torch.from_numpy(np.stack(windows)))
        pos += batch
    return out


def test_flat_batch_rule_with_a_shape_changing_at_every_step(position_files):
    expected = flat_record_rows(FLAT_SCHEDULE)
    for world_size, micro in [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)]:
        group = loaders(position_files, world_size, micro, shard_boundary="batch")
        got = global_batches(group, FLAT_SCHEDULE)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), (world_size, micro)
    assert group[0].epoch == 0 and group[0].state_dict()["shard"] == 3
    (original,) = loaders(position_files, 1, 4, shard_boundary="batch")
    global_batches([original], FLAT_SCHEDULE[:3])
    resumed = loaders(position_files, 2, 2, shard_boundary="batch")
    for loader in resumed:
        loader.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(expected[3:], global_batches(resumed, FLAT_SCHEDULE[3:])))


def test_flat_sequence_rule_continues_where_a_shorter_seq_len_stopped(position_files):
    (loader,) = loaders(position_files, 1, 1)
    first, second = global_batches([loader], [(SEQ, BATCH), (2 * SEQ, BATCH)])
    assert torch.equal(first, torch.from_numpy(np.stack([k * SEQ + np.arange(SEQ + 1) for k in range(8)])))
    assert torch.equal(second, torch.from_numpy(np.stack([BATCH + k * 2 * SEQ + np.arange(2 * SEQ + 1)
                                                          for k in range(4)])))


def test_a_version_1_flat_state_resumes_at_its_window(position_files):
    """Version 1 stored the window count after the epoch's offset; it resumes at offset + count·seq_len."""
    (loader,) = loaders(position_files, 1, 8, seed=0, shard_boundary="batch")
    offset = loader._epoch_plan(1)[1]
    assert offset > 0
    old = {"version": 1, "step": 30, "epoch": 1, "shard": 2, "sequence": 8, "seed": 0, "seq_len": SEQ,
           "bos_aligned": False, "shard_boundary": "batch", "files": [f.name for f in position_files]}
    loader.load_state_dict(old)
    shard = loader._epoch_plan(1)[0][2]
    assert POSITION_SHARDS[shard] > offset + 2 * BATCH + 1  # so the batch is taken from this shard
    assert torch.equal(global_batches([loader], 1)[0], expected_rows(shard, offset + BATCH))
    assert loader.state_dict()["position"] == offset + 2 * BATCH and loader.step == 31


def test_no_shard_holding_a_whole_batch_is_an_error(tmp_path):
    exact = shards.write_shard(tmp_path / "e_train_000000.bin", np.ones(BATCH + 1, dtype=np.uint16))
    (loader,) = loaders([exact], 1, 8, shard_boundary="batch")
    with pytest.raises(DataError, match=f"no train shard holds a batch of {BATCH + 1} tokens"):
        loader.next_batch()
    enough = shards.write_shard(tmp_path / "e_train_000001.bin", np.ones(BATCH + 2, dtype=np.uint16))
    (loader,) = loaders([exact, enough], 1, 8, shard_boundary="batch")
    assert rows(*loader.next_batch()[0]).shape == (8, SEQ + 1)
    # documents of one token: a sequence packs 17, so these 128 make 7 sequences
    docs = shards.write_shard(tmp_path / "d_train_000000.bin", np.full(8 * SEQ, EOT, dtype=np.uint16))
    (loader,) = loaders([docs], 1, 8, bos_aligned=True, shard_boundary="batch")
    with pytest.raises(DataError, match=f"no train shard holds a batch of 8 sequences of {SEQ + 1} tokens packed"):
        loader.next_batch()


@pytest.fixture
def val_files(tmp_path):
    rng = np.random.default_rng(1)
    return [shards.write_shard(tmp_path / f"x_val_{i:06d}.bin", make_stream(rng, n)) for i, n in enumerate([50, 45, 40])]


def test_val_set_is_the_same_for_any_world_size(val_files):
    stream = np.concatenate([shards.read_shard(f) for f in val_files]).astype(np.int32)
    val_tokens = 7 * SEQ + 5  # the remainder short of a whole sequence is left out
    reference = [stream[k * SEQ:k * SEQ + SEQ + 1] for k in range(7)]
    for world_size in (1, 2, 3, 4, 8):
        got = {}
        for rank in range(world_size):
            batches = list(val_batches(val_files, val_tokens=val_tokens, seq_len=SEQ, rank=rank, world_size=world_size))
            for j, (inputs, targets) in enumerate(batches):
                assert inputs.shape == targets.shape == (1, SEQ)
                got[rank + j * world_size] = rows(inputs, targets)[0].numpy()
        assert sorted(got) == list(range(7))
        assert all(np.array_equal(got[k], reference[k]) for k in range(7))


def test_val_set_larger_than_the_shards_is_refused(val_files):
    with pytest.raises(DataError, match=r"hold 135 tokens.*x_val_000000\.bin"):
        val_batches(val_files, val_tokens=9 * SEQ, seq_len=SEQ)


def test_find_shards(tmp_path, train_files, val_files):
    train, val = find_shards(tmp_path, "*_train_*.bin", "*_val_*.bin")
    assert train == sorted(train_files) and val == sorted(val_files)
    with pytest.raises(DataError, match=r"no val shards matching 'nope_\*' in"):
        find_shards(tmp_path, "*_train_*.bin", "nope_*")
    with pytest.raises(DataError, match="does not exist"):
        find_shards(tmp_path / "missing", "*", "*")
