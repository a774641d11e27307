"""Run directories written by config version 1 (tests/fixtures/v1, made by the code of that
version) still load, and resume to the losses their own uninterrupted runs logged."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import SMALL_RUN, read_metrics, run_cli
from speedrun import checkpoint
from speedrun.config import load_config, scale_steps, to_dict

V1 = Path(__file__).parent / "fixtures" / "v1"
SHAPE = ["model.vocab_size=256", "model.model_dim=32", "model.n_head=1", "model.head_dim=32", "model.n_layer=4",
         "data.seq_len=128", "data.batch_tokens=512", "data.micro_batch_seqs=2", "data.val_tokens=1024",
         "data.val_seq_len=128", "train.compile=false", "train.save_every=4", "train.keep=0",
         f"data.dir={json.dumps(str(V1 / 'data'))}"]
RUNS = {"tiny-2025": ["model.long_short_pattern=LSSL", "model.value_embeds=1", "model.window_max=256"],
        "baseline-tiny": ["model.max_seq_len=128", "train.steps=70"]}  # its length when the fixture was made
FOLDER = {"tiny-2025": "tiny", "baseline-tiny": "baseline"}


@pytest.mark.parametrize("preset", RUNS)
def test_a_version_1_checkpoint_reads_as_the_preset_it_was_trained_with(preset):
    saved = checkpoint.read_config(V1 / FOLDER[preset] / "checkpoints" / "step_000004")
    saved.data.dir = str(V1 / "data")  # where the fixture's data lives now
    asked = load_config(preset, None, [*SHAPE, *RUNS[preset]])
    scale_steps(asked, 8)  # as the run's --steps 8 --val-every 4
    asked.train.val_every = 4
    # the 2025 tiny was renamed tiny-2025 with a new description; every setting is the same
    saved.description = asked.description
    assert to_dict(saved) == to_dict(asked)


@pytest.mark.parametrize("preset", RUNS)
def test_a_version_1_run_resumes_to_its_own_losses(tmp_path, preset):
    run = tmp_path / "run"
    shutil.copytree(V1 / FOLDER[preset], run)
    expected = [json.loads(line) for line in (run / "expected_metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected if r["step"] <= 4))
    # The preset named again, as a researcher resuming would: its keys must equal the checkpoint's.
    sets = [arg for s in [*SHAPE, *RUNS[preset]] if not s.startswith("data.dir") for arg in ("--set", s)]
    run_cli("train", "--preset", preset, *sets, "--steps", "8", "--val-every", "4", "--data", str(V1 / "data"), "--resume", str(run), "--out", str(run))
    got = {(r["step"], "val_loss" in r): r.get("val_loss", r.get("train_loss")) for r in read_metrics(run)}
    want = {(r["step"], "val_loss" in r): r.get("val_loss", r.get("train_loss")) for r in expected}
    assert set(got) == set(want)
    for key in sorted(want):
        assert got[key] == want[key], key


AUTO_DTYPE_RUN = [*SMALL_RUN, "--preset", "tiny-2025", "--device", "cpu", "--steps", "4", "--val-every", "0"]


@pytest.fixture(scope="module")
def two_steps_saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("auto-dtype") / "run"
    run_cli("train", *AUTO_DTYPE_RUN, "--steps", "2", "--save-every", "2", "--out", str(run))
    return run


# (activation_dtype, orthogonalize_dtype) written into the checkpoint's state.json -> what the
# resumed run must train in; None: the keys are missing, as in checkpoints from before "auto"
# looked at the CPU
PINNED = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "bfloat16"), None: ("float32", "bfloat16")}


@pytest.mark.slow  # a resumed `speedrun train` process each: about 10 s on 2 cores
@pytest.mark.parametrize("saved", PINNED)
def test_auto_dtypes_resume_in_the_dtypes_the_run_trained_in(tmp_path, two_steps_saved, saved):
    """model.activation_dtype and optim.orthogonalize_dtype = "auto" resume in the dtypes state.json
    says the run trained in, whatever "auto" picks on this machine, and the resumed run's next
    checkpoint says the same; a checkpoint without them resumes as such runs trained on CPU:
    float32 activations, bf16 orthogonalisation."""
    run = tmp_path / "run"
    shutil.copytree(two_steps_saved, run)
    state_file = run / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["activation_dtype"] in ("float32", "bfloat16") and state["orthogonalize_dtype"] in ("float32", "bfloat16")
    for key, value in zip(("activation_dtype", "orthogonalize_dtype"), (saved, saved)):
        if value is None:
            del state[key]
        else:
            state[key] = value
    state_file.write_text(json.dumps(state))
    run_cli("train", *AUTO_DTYPE_RUN, "--resume", "auto", "--out", str(run))
    activations, orthogonalize = PINNED[saved]
    header = [line for line in (run / "log.txt").read_text().splitlines() if line.startswith("path:")][-1]
    assert f"activations: {activations}" in header
    resumed = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert (resumed["activation_dtype"], resumed["orthogonalize_dtype"]) == (activations, orthogonalize)
