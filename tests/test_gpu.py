"""The training path on a CUDA device, as `speedrun train` runs it: no host syncs inside a compiled
step, no recompiles as the window grows, bf16 in every matmul and attention, the compiled bf16 model
against a float32 reference tight enough to see a wrong mask, and FlexAttention without
torch.compile never holding a (T, T) score matrix.

Every test here is marked `gpu` (tests/conftest.py skips them without CUDA) and uses the tiny
preset's recipe cut to four layers (both window lengths, both value-embedding tables and the U-net
skips stay), with random rather than zero output projections and head, so that every parameter
reaches the logits. Data are small random shards written into tmp_path, so no corpus is built.
On an H100 each test should take well under a minute, most of it compilation; the compiled tests
share one training graph, so after the first its compile comes from the inductor cache
($SPEEDRUN_CACHE/inductor, as `speedrun train` uses)."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import speedrun.attention
from speedrun.attention import NO_WINDOW, flex_masks, use_flex, window_tokens
from speedrun.prepare import graphs_compiled
from speedrun.config import load_config
from speedrun.data import shards
from speedrun.data.tokenizer import EOT
from speedrun.distributed import setup
from speedrun.model import GPT
from speedrun.train import Trainer
from conftest import Compiles, prepared
from test_model import MatmulDtypes

DEVICE = "cuda"

# tiny at four layers: L and S windows, value embeddings in the first two and last two layers,
# U-net skips; random output projections and head. seq_len 1024, 2 sequences per micro-step and
# 4,096 tokens per step: 2 accumulation steps at world size 1.
SMALL = ["model.n_layer=4", "model.long_short_pattern=LSSL", "model.value_embeds=2",
         "model.zero_init_proj=false", "model.zero_init_head=false",
         "data.seq_len=1024", "data.micro_batch_seqs=2", "data.batch_tokens=4096",
         "data.val_seq_len=1024", "data.val_tokens=2048"]

# Document starts of the (2, 1024) input that test_compiled_trainer_step_matches_float32_reference
# feeds: short documents (document masking matters) and ones much longer than the 256-token window
# (the window matters).
DOC_STARTS = [[0, 40, 600], [0, 333, 350, 900]]

# Max |logit difference| allowed between the compiled bf16 model and the float32 reference.
# Measured on CPU (2026-11-25, this config compiled with bf16 activations and SDPA): the bf16 model
# is within 0.015 of the reference on these inputs, while float32 references without the window,
# without document masks, or with the token instead of the block window rule are 0.52, 0.77 and
# 0.53 away. The tolerance sits between, and the test checks that the wrong references stay more
# than WRONG_FACTOR tolerances away on the GPU too. No GPU measurement yet: the test prints its
# figures (pytest -s) for the first GPU run to record, and to tighten LOGIT_TOL if they allow.
LOGIT_TOL = 0.05
WRONG_FACTOR = 5
# The same comparison for the loss in training mode, where the head is the FP8 matmul (on GPUs with
# compute capability >= 8.9). A loss averages over every position, so it is a sanity check of the
# training graph only: on CPU dropping the window moves it by 3e-4, less than the FP8 head does
# (1.2e-3 with FP8 on the CPU, compiled).
LOSS_TOL = 5e-3


def write_shards(directory, *, train_tokens=60_000, val_tokens=4_096, vocab=EOT, documents=True, seed=0):
    """One train and one val shard of random tokens below `vocab`; with `documents`, every 50 to
    700 tokens a BOS starts a new document."""
    rng = np.random.default_rng(seed)

    def stream(n):
        tokens = rng.integers(0, vocab, n).astype(np.uint16)
        pos = 0
        while documents and pos < n:
            tokens[pos] = EOT
            pos += int(rng.integers(50, 700))
        return tokens

    directory.mkdir(parents=True, exist_ok=True)
    shards.write_shard(directory / "gpu_train_000000.bin", stream(train_tokens))
    shards.write_shard(directory / "gpu_val_000000.bin", stream(val_tokens))
    return directory


def make_trainer(tmp_path, *overrides, compile=True, **data):
    """A Trainer on DEVICE for SMALL plus `overrides`, reading shards written by write_shards(**data)."""
    data_dir = write_shards(tmp_path / "data", **data)
    cfg = load_config("tiny-2025", None, [*SMALL, f"data.dir={json.dumps(str(data_dir))}", f"train.device={DEVICE}",
                                     f"train.compile={json.dumps(compile)}", *overrides])
    rt = setup(DEVICE)
    assert rt.world_size == 1
    return Trainer(cfg, rt, "test_gpu")


def synchronize():
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def documents_input(T=1024):
    """(2, T) int32 tokens on DEVICE with documents starting at DOC_STARTS."""
    idx = torch.randint(0, EOT, (len(DOC_STARTS), T), generator=torch.Generator().manual_seed(1))
    for row, starts in enumerate(DOC_STARTS):
        idx[row, starts] = EOT
    return idx.to(torch.int32).to(DEVICE)


def first_step_of_each_window(cfg) -> dict[int, int]:
    """window value -> the first step of the run that uses it."""
    first = {}
    for step in range(cfg.train.steps + 1):
        first.setdefault(window_tokens(step, cfg.train.steps, cfg.model), step)
    return first


class SyncDebugErrors:
    """torch.cuda.set_sync_debug_mode("error") for the block, reset to "default" however it ends.
    On entry it checks that the mode is live: a known synchronising call (.item()) must raise,
    otherwise a clean run of the block would prove nothing."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError):
                torch.ones((), device=DEVICE).item()
        except BaseException:
            torch.cuda.set_sync_debug_mode("default")
            raise
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return False


@pytest.mark.gpu
def test_no_host_sync_in_a_compiled_train_step(tmp_path):
    """After warm-up (compilation may sync), whole optimizer steps of the compiled model, gradient
    accumulation included, queue their work without once waiting for the device: the data copies
    come from pinned memory, the window is a cached device tensor, the loss stays on the device."""
    trainer = make_trainer(tmp_path)
    assert trainer.cfg.train.compile and trainer.rt.world_size == 1 and trainer.accum == 2
    trainer.warm_up(2)
    synchronize()
    with SyncDebugErrors():
        losses = [trainer.train_step(step) for step in range(3)]
    synchronize()
    assert all(loss.device.type == torch.device(DEVICE).type for loss in losses)
    assert torch.stack(losses).isfinite().all()


@pytest.mark.gpu
def test_no_host_sync_in_a_compiled_2026_train_step(tmp_path):
    """The same for the 2026 recipe (the tiny preset as it is): NorMuon, the record's Adam on every
    other step, multi-token and prefix losses, the varlen masks and the stage's window schedule."""
    data_dir = write_shards(tmp_path / "data")
    cfg = load_config("tiny", None, [f"data.dir={json.dumps(str(data_dir))}", f"train.device={DEVICE}",
                                     "data.val_seq_len=1024", "data.val_tokens=2048"])
    trainer = Trainer(cfg, setup(DEVICE), "test_gpu")
    before = graphs_compiled()
    trainer.warm_up(2, until=3)  # the shapes of the steps trained here, not the third stage's 2,048 tokens
    assert graphs_compiled() > before  # compiled, as `speedrun train` runs it
    synchronize()
    with SyncDebugErrors():
        losses = [trainer.train_step(step) for step in range(3)]
    synchronize()
    assert torch.stack(losses).isfinite().all()


@pytest.mark.gpu
def test_no_recompiles_as_the_window_grows(tmp_path):
    """Train steps at the first step of every window value of the run (128, 256, 384 and 512
    tokens over tiny's stages), and a validation at the last, compile nothing new once step 0
    has been trained and validated: the window reaches the compiled graph as a device tensor."""
    trainer = make_trainer(tmp_path)
    first = first_step_of_each_window(trainer.cfg)
    assert len(first) >= 3, first
    steps = sorted(first.values())
    trainer.warm_up(2)
    trainer.validate(steps[0])  # the evaluation graph: another mode and shape, compiled here
    before = graphs_compiled()
    with Compiles() as compiled:
        losses = [trainer.train_step(step) for step in steps]
        val_loss = trainer.validate(steps[-1])
    assert graphs_compiled() == before and not compiled.frames, compiled.frames
    assert len({id(trainer._windows_at(step)["window_tokens"]) for step in steps}) == len(steps)  # one window tensor per value
    assert torch.stack(losses).isfinite().all() and np.isfinite(val_loss)


@pytest.mark.gpu
def test_bf16_activations_on_cuda():
    """Eager model with SDPA, configured for CUDA: the embedding tables are bf16 and every matmul
    and attention kernel, forward and backward, reads bf16 (the attention backward also reads its
    float32 logsumexp, which MatmulDtypes leaves out). The FP8 head is switched off here, so that
    the head's forward and backward matmuls are recorded too; the FP8 op's inputs are bf16 by
    construction and tests/test_fp8.py checks it."""
    cfg = load_config("tiny-2025", None, [*SMALL, "model.attention=sdpa", "model.fp8_head=off"]).model
    torch.manual_seed(0)
    model = prepared(GPT(cfg), DEVICE)
    assert model.activation_dtype == torch.bfloat16 and model.lm_head.fp8_scales is None
    assert model.wte.weight.dtype == model.value_embeds[0].weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.qkv.dtype == torch.float32  # weights stay float32, cast where used
    idx = documents_input()
    window = torch.tensor(256, dtype=torch.int32, device=DEVICE)
    with MatmulDtypes() as seen:
        loss = model(idx, idx.roll(-1, 1).long(), window_tokens=window)
        loss.backward()
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert "mm" in seen.seen, seen.seen
    assert any("scaled_dot_product" in name for name in seen.seen), seen.seen
    assert all(dtypes == {torch.bfloat16} for dtypes in seen.seen.values()), seen.seen
    assert model.wte.weight.grad.dtype == torch.bfloat16 and model.blocks[0].attn.qkv.grad.dtype == torch.float32


def float32_reference(trainer, **changes):
    """An eager float32 SDPA model holding the trainer's weights (its bf16 tables cast to float32),
    with ModelConfig `changes` (e.g. document_mask=False, to build a deliberately wrong one)."""
    cfg = copy.deepcopy(trainer.cfg.model)
    cfg.attention, cfg.activation_dtype, cfg.fp8_head = "sdpa", "float32", "off"
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = prepared(GPT(cfg), trainer.device, "eval")
    model.load_state_dict(trainer.model.state_dict())
    assert model.wte.weight.dtype == torch.float32 and model.activation_dtype == torch.float32
    return model.eval()


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.gpu
def test_compiled_trainer_step_matches_float32_reference(tmp_path):
    """The Trainer's compiled model (FlexAttention with block windows, bf16, FP8 head in training)
    against a float32 eager SDPA reference with the same weights, on two rows of several documents
    and a 256-token window much shorter than the 1024-token sequence.

    Logits are compared in eval mode, where the head is a bf16 matmul: the FP8 head is an
    approximation with its own test (tests/test_fp8.py), and logits, unlike a loss, show an error
    at any single position. Max |difference| must be below LOGIT_TOL while three wrong float32
    references (no window; no document masks; the token window rule instead of the block rule)
    each differ from the right one by more than WRONG_FACTOR * LOGIT_TOL, so a mask error cannot
    hide inside the tolerance. The training-mode loss (the real training graph, FP8 head) is
    compared too, loosely. Then one optimizer step: the loss is finite and every parameter changed
    where it should and only there (embedding rows of tokens the step did not read, and the
    head's padding rows, get no gradient and stay put)."""
    trainer = make_trainer(tmp_path)
    cfg = trainer.cfg
    assert use_flex(cfg.model, cfg.data.seq_len, trainer.device) == (trainer.device.type == "cuda")
    step = first_step_of_each_window(cfg)[256]
    window = trainer._windows_at(step)["window_tokens"]
    idx = documents_input(cfg.data.seq_len)
    targets = idx.roll(-1, 1).long()
    reference = float32_reference(trainer)
    wrong = {"no window": (reference, NO_WINDOW), "no document masks": (float32_reference(trainer, document_mask=False), window),
             "token window rule": (float32_reference(trainer, window_granularity="token"), window)}

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a true float32 reference: no TF32
    try:
        trainer.model.eval()
        with torch.no_grad():
            compiled = trainer.forward(idx, None, window_tokens=window)
            expected = reference(idx, None, window_tokens=window)
            errors = {name: max_error(model(idx, None, window_tokens=w), expected) for name, (model, w) in wrong.items()}
            ref_loss = reference(idx, targets, window_tokens=window)
        trainer.model.train()
        train_loss = trainer.forward(idx, targets, window_tokens=window).detach()  # the training graph
    finally:
        torch.set_float32_matmul_precision(previous)
        trainer.model.train()
    error = max_error(compiled, expected)
    print(f"max |logit error|: compiled bf16 {error:.4f} (tolerance {LOGIT_TOL}); wrong references: "
          + ", ".join(f"{name} {e:.4f}" for name, e in errors.items())
          + f"; loss: train mode {train_loss.item():.5f} vs reference {ref_loss.item():.5f}")
    assert compiled.dtype == torch.float32 and compiled.shape == (*idx.shape, cfg.model.vocab_size)
    assert error < LOGIT_TOL
    for name, e in errors.items():
        assert e > WRONG_FACTOR * LOGIT_TOL, f"the reference with {name} is within {e:.4f}: the tolerance cannot see it"
    assert abs(train_loss.item() - ref_loss.item()) < LOSS_TOL

    # one optimizer step; first read the batch it will train on, then rewind the loader
    state = trainer.loader.state_dict()
    batch = trainer.loader.next_batch()
    trainer.loader.load_state_dict(state)
    again = trainer.loader.next_batch()
    trainer.loader.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batch, again))
    read = torch.zeros(cfg.model.vocab_size, dtype=torch.bool, device=trainer.device)
    for inputs, _ in batch:
        read[inputs.flatten().long()] = True
    assert 0 < read.sum() < cfg.model.vocab_size
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    loss = trainer.train_step(step)
    assert loss.isfinite()
    tables = {"wte.weight"} | {f"value_embeds.{i}.weight" for i in range(cfg.model.value_embeds)}
    for name, p in trainer.model.named_parameters():
        changed = p.detach() != before[name]
        if name in tables:  # rows change exactly for the tokens read
            assert torch.equal(changed.any(dim=1), read), name
        elif name == "lm_head.weight":  # every vocabulary row changes, no padding row does
            rows = changed.any(dim=1)
            assert rows[:cfg.model.vocab_size].all() and not rows[cfg.model.vocab_size:].any(), name
        elif p.ndim >= 2:  # Muon: its bf16 Newton-Schulz leaves ~0.2% exact zeros in an update (CPU)
            assert changed.float().mean() > 0.99, f"{name}: {changed.float().mean():.4f} of its elements changed"
        else:  # scalars (Adam)
            assert changed.all(), f"{name}: {changed.float().mean():.3f} of its elements changed"


@pytest.mark.gpu
def test_no_compile_flex_does_not_materialise_scores(tmp_path, monkeypatch):
    """With --no-compile the model runs eagerly but attention.attend compiles flex_attention alone,
    so a step at seq_len 16384 never holds a (T, T) score matrix: its peak memory stays below a
    quarter of one layer's bf16 scores (T² × 2 bytes × heads = 4 GiB here), while eager
    flex_attention on the same shapes, measured as the control, goes far past it. A 256-token
    vocabulary keeps the logits small, so attention is what would dominate."""
    T, heads, head_dim = 16384, 8, 16
    trainer = make_trainer(tmp_path, f"data.seq_len={T}", "data.micro_batch_seqs=1", f"data.batch_tokens={T}",
                           f"data.val_seq_len={T}", f"data.val_tokens={T}", "model.n_layer=2",
                           "model.long_short_pattern=LS", "model.value_embeds=1", f"model.n_head={heads}",
                           f"model.head_dim={head_dim}", "model.vocab_size=256",
                           compile=False, vocab=256, documents=False, train_tokens=3 * T + 10, val_tokens=T + 10)
    assert not trainer.cfg.train.compile and use_flex(trainer.cfg.model, T, trainer.device)
    calls = []
    compiled_flex = speedrun.attention._compiled_flex_attention

    def counting():
        fn = compiled_flex()

        def run(*args, **kwargs):
            calls.append(args[0].shape)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(speedrun.attention, "_compiled_flex_attention", counting)
    trainer.warm_up(1)  # compiles flex_attention's forward and backward kernels
    synchronize()
    calls.clear()
    torch.cuda.reset_peak_memory_stats()
    loss = trainer.train_step(0)
    synchronize()
    peak = torch.cuda.max_memory_allocated()
    bound = T * T * 2 * heads // 4
    assert calls and all(shape == (1, heads, T, head_dim) for shape in calls), calls
    assert loss.isfinite()

    # the control: eager flex_attention on one layer's shapes (forward only) materialises scores
    del trainer, loss
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(1, heads, T, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    mask = flex_masks(None, torch.tensor(512, dtype=torch.int32, device=DEVICE), T, 128, q.device)["L"]
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            flex_attention(q, k, v, block_mask=mask)
        synchronize()
        eager = torch.cuda.max_memory_allocated() - start
    except torch.OutOfMemoryError:
        eager = float("inf")  # running out of memory shows materialisation as well
    print(f"seq_len {T}: peak of a --no-compile step {peak / 2**20:,.0f} MiB; bound {bound / 2**20:,.0f} MiB; "
          f"eager flex_attention forward alone {eager / 2**20:,.0f} MiB")
    assert peak < bound
    assert eager > bound, "the control did not exceed the bound, so the bound proves nothing"


@pytest.mark.gpu
def test_warm_up_compiles_every_stage_shape(tmp_path):
    """tiny with a sequence length per stage (512, then 1,024 tokens) and 2, 4, 6 sequences per
    step: after the warm-up, the first two steps of every stage and of the extension (Adam stepping
    on every other step) compile nothing new, so no compile lands on the clock."""
    data_dir = write_shards(tmp_path / "data")
    cfg = load_config("tiny", None, [f"data.dir={json.dumps(str(data_dir))}", f"train.device={DEVICE}",
                                          "stages.seq_len=[512, 1024, 1024, 1024]",
                                          "stages.batch_tokens=[1024, 4096, 6144, 6144]",
                                          "data.val_seq_len=1024", "data.val_tokens=2048"])
    trainer = Trainer(cfg, setup(DEVICE), "test_gpu")
    starts = [0, *cfg.stages.ends]
    assert trainer.warm_up_steps(2) == [0, 1, starts[1], starts[1] + 1]  # later stages have stage 2's shape
    trainer.warm_up(2)
    trainer.validate(0)  # the evaluation graph, off the clock
    before = graphs_compiled()
    with Compiles() as compiled:
        losses = [trainer.train_step(step) for start in starts for step in (start, start + 1)]
    assert graphs_compiled() == before and not compiled.frames, compiled.frames
    assert torch.stack(losses).isfinite().all()
