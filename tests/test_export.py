"""`speedrun export` and the loaders behind sample/eval: a run, a checkpoint or an export folder all
give back the same model, in eval mode and float32, with identical logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from speedrun import checkpoint
from speedrun.config import load_config, to_dict
from speedrun.data.tokenizer import EOT
from speedrun.distributed import Runtime
from speedrun.errors import DataError, UsageError
from speedrun.export import export, from_pretrained  # from_pretrained: the import exported READMEs show
from speedrun.loading import final_window, load_model
from speedrun.model import GPT

# Smaller than conftest.SMALL_RUN: two steps, no untimed warm-up, and a validation set of one
# sequence, so a real checkpoint costs seconds.
TINY_RUN = ["--steps", "2", "--val-every", "0", "--no-compile", "--set", "train.warmup_steps_untimed=0",
            "--set", "data.seq_len=128", "--set", "data.micro_batch_seqs=2", "--set", "data.batch_tokens=256",
            "--set", "data.val_tokens=1024", "--set", "data.val_seq_len=512", "--set", "model.window_max=256"]


def trained_run(tmp_path_factory) -> Path:
    """A run directory trained by `speedrun train --preset tiny`, made once per test session and
    shared by the test modules that need a real checkpoint."""
    out = tmp_path_factory.getbasetemp() / "trained-tiny"
    if not (out / "summary.json").is_file():
        run_cli("train", "--preset", "tiny-2025", *TINY_RUN, "--out", str(out))
    return out


def saved_run(run_dir: Path, preset: str, seed: int = 0, bf16_embeddings: bool = False) -> Path:
    """A run directory holding one checkpoint of a freshly initialised model (head and projections
    random rather than zero, so every weight reaches the logits), written by checkpoint.save as the
    trainer writes it; with bf16_embeddings, the tables are saved in bf16 as CUDA runs save them."""
    cfg = load_config(preset)
    cfg.model.zero_init_head = cfg.model.zero_init_proj = False
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    if bf16_embeddings:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.bfloat16()
    checkpoint.save(run_dir, model, [], {"step": 0}, cfg, Runtime(0, 1, 0, torch.device("cpu")), keep=1)
    return run_dir


def logits(model, seed=0, T=96):
    idx = torch.randint(0, EOT, (2, T), generator=torch.Generator().manual_seed(seed))
    idx[:, 0] = idx[:, 40] = EOT
    with torch.no_grad():
        return model(idx, window_tokens=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_export_reloads_with_identical_logits(run, tmp_path):
    out = tmp_path / "exported"
    r = run_cli("export", str(run), "--out", str(out))
    assert r.stdout.split() == [str(out / "model.safetensors"), str(out / "config.json"), str(out / "README.md")]
    ckpt = checkpoint.list_checkpoints(run)[-1]
    assert json.loads((out / "config.json").read_text()) == to_dict(checkpoint.read_config(ckpt))
    assert "from_pretrained" in (out / "README.md").read_text()

    model = from_pretrained(out)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg, original = load_model(run, "cpu")
    assert torch.equal(logits(model), logits(original))
    # every weight is the checkpoint's, not a fresh initialisation's
    for (name, p), q in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(p, q), name
    # and the exported folder is itself accepted wherever a run or checkpoint is
    assert torch.equal(logits(load_model(out, "cpu")[1]), logits(model))
    assert final_window(cfg) == (256, None)


def test_export_replaces_an_earlier_export_only_with_overwrite(tmp_path):
    first, second = saved_run(tmp_path / "first", "baseline-tiny", seed=0), saved_run(tmp_path / "second", "baseline-tiny", seed=1)
    out = tmp_path / "out"
    export(first, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_cli("export", str(second), "--out", str(out), check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"speedrun export: error: --out {out} already holds an export (model.safetensors, "
                                f"config.json, README.md); replace it with --overwrite, or choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_cli("export", str(second), "--out", str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left behind
    assert torch.equal(logits(from_pretrained(out)), logits(load_model(second, "cpu")[1]))
    assert not torch.equal(logits(from_pretrained(out)), logits(load_model(first, "cpu")[1]))


def test_a_failed_export_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A write that fails halfway (here the weights: a full disk, a kill) replaces nothing and leaves
    no temporary file behind."""
    out = export(saved_run(tmp_path / "first", "baseline-tiny"), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def torn_write(model, filename):
        Path(filename).write_bytes(b"half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("speedrun.export.save_model", torn_write)
    with pytest.raises(OSError):
        export(saved_run(tmp_path / "second", "baseline-tiny", seed=1), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tied_head_survives_export(tmp_path):
    run = saved_run(tmp_path / "baseline", "baseline-tiny")
    run_cli("export", str(run), "--out", str(tmp_path / "out"))
    model = from_pretrained(tmp_path / "out")
    assert model.lm_head.weight is None and model.head_weight.data_ptr() == model.wte.weight.data_ptr()
    assert torch.equal(logits(model), logits(load_model(checkpoint.list_checkpoints(run)[-1], "cpu")[1]))


def test_bf16_embeddings_load_as_float32(tmp_path):
    run = saved_run(tmp_path / "bf16", "tiny-2025", bf16_embeddings=True)
    _, model = load_model(run, "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tables = load_file(str(checkpoint.list_checkpoints(run)[-1] / "model.safetensors"))
    assert tables["wte.weight"].dtype == torch.bfloat16
    assert torch.equal(model.wte.weight, tables["wte.weight"].float())


def test_missing_checkpoint_is_one_line_usage_error(tmp_path):
    (tmp_path / "empty-run").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty-run"):
        r = run_cli("export", str(path), "--out", str(tmp_path / "out"), check=False)
        assert r.returncode == 2
        assert r.stderr.strip() == (f"speedrun export: error: {path}: no checkpoint there (expected a run directory "
                                    f"with checkpoints/step_*, a checkpoint directory or a folder written by "
                                    f"`speedrun export`)")
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_or_lies_under_a_file_is_refused_before_loading(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, why in [(afile, "exists and is not a folder"), (afile / "model", f"{afile} is a file, not a folder")]:
        with pytest.raises(UsageError) as caught:
            export(tmp_path / "no-run-here", out)  # the run is not looked at: the folder is refused first
        assert str(caught.value) == f"--out {out}: {why}"
    assert afile.read_text() == "x"


@pytest.mark.parametrize("damage,detail", [
    ("missing", 'Missing key(s) in state_dict: "blocks.0.mlp.fc.weight"'),
    ("unexpected", 'Unexpected key(s) in state_dict: "extra.weight"'),
    ("shape", "size mismatch for blocks.0.mlp.fc.weight: copying a param with shape torch.Size([3, 128]) from "
              "checkpoint, the shape in current model is torch.Size([512, 128])."),
])
def test_weights_that_do_not_fit_the_config_are_one_line_naming_the_key(run, tmp_path, damage, detail):
    """Loading for sample/eval/export and resuming a run both say which key differs: torch's message
    has it on the lines after its first ("Error(s) in loading state_dict for GPT:")."""
    run = Path(shutil.copytree(run, tmp_path / "run"))
    ckpt = checkpoint.list_checkpoints(run)[-1]
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    if damage == "missing":
        del tensors["blocks.0.mlp.fc.weight"]
    elif damage == "unexpected":
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors["blocks.0.mlp.fc.weight"] = tensors["blocks.0.mlp.fc.weight"][:3].contiguous()
    save_file(tensors, str(path))
    expected = f"{path}: cannot load weights ({detail})"
    with pytest.raises(DataError) as loading:
        load_model(run, device="cpu")
    with pytest.raises(DataError) as resuming:
        checkpoint.load(ckpt, GPT(checkpoint.read_config(ckpt).model), [], Runtime(0, 1, 0, torch.device("cpu")))
    assert str(loading.value) == str(resuming.value) == expected
