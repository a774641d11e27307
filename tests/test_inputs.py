"""Bad input is one line and a clean exit, found before any expensive work: config values out of
range, config paths that are not config files, data too small for the run or with token ids the
model cannot embed, damaged run directories, unknown presets in `bench`."""

import numpy as np
import pytest

from conftest import SMALL_RUN, run_cli
from speedrun.config import ConfigError, load_config
from speedrun.data import shards
from speedrun.data.tokenizer import EOT


@pytest.mark.parametrize("override,message", [
    ("optim.lr_hidden=-0.1", "'optim.lr_hidden' must be at least 0.0, got -0.1"),
    ("optim.lr_embed=-1", "'optim.lr_embed' must be at least 0.0, got -1.0"),
    ("optim.cooldown_frac=1.5", "'optim.cooldown_frac' must be in [0.0, 1.0], got 1.5"),
    ("optim.final_lr_frac=-0.1", "'optim.final_lr_frac' must be in [0.0, 1.0], got -0.1"),
    ("optim.muon_momentum=1.0", "'optim.muon_momentum' must be in [0, 1), got 1.0"),
    ("optim.adam_betas=[0.9, 1.2]", "'optim.adam_betas[1]' must be in [0, 1), got 1.2"),
    ("optim.adam_eps=0", "'optim.adam_eps' must be positive, got 0.0"),
    ("optim.warmup_steps=-3", "'optim.warmup_steps' must be at least 0, got -3"),
])
def test_values_out_of_range_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-2025", None, [override])
    assert str(e.value) == message


def test_a_config_path_that_is_a_folder_or_not_text(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(None, tmp_path)
    binary = tmp_path / "weights.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(None, binary)


def _data(folder, train_tokens, val_tokens, top=1000):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, n in (("d_train_000.bin", train_tokens), ("d_val_000.bin", val_tokens)):
        tokens = rng.integers(0, top, n).astype(np.uint16)
        tokens[0] = EOT
        shards.write_shard(folder / name, tokens)
    return folder


def _train(data, out, *extra):
    return run_cli("train", "--preset", "tiny-2025", "--data", str(data), "--out", str(out), *SMALL_RUN, *extra, check=False)


def _one_error_line(r, code=1) -> str:
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("speedrun train: no --preset")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_data_too_small_for_the_run_is_refused_at_start_up(tmp_path):
    """SMALL_RUN's 70 steps of 512 tokens need 35,840 train tokens; 10,000 would be 3.6 passes."""
    data = _data(tmp_path / "small", 10_000, 5_000)
    line = _one_error_line(_train(data, tmp_path / "a"))
    assert "the train shards hold 10,000 tokens but 70 steps need 35,840, 3.6 passes" in line
    assert "data.allow_repeat=true" in line
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    short_val = _data(tmp_path / "short-val", 40_000, 1_000)
    line = _one_error_line(_train(short_val, tmp_path / "b"))
    assert "the val shards hold 1,000 tokens, fewer than the 2,049" in line


def test_token_ids_beyond_the_vocabulary_name_the_shard(tmp_path):
    data = _data(tmp_path / "wide", 40_000, 5_000, top=60_000)
    line = _one_error_line(_train(data, tmp_path / "a"))
    assert "d_train_000.bin: token id" in line and "out of range for a vocabulary of 50257" in line


def test_damaged_run_directories_are_one_line(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 4, "world_size": 1}')
    line = _one_error_line(run_cli("train", "--resume", str(tmp_path / "run"), check=False))
    assert "config.toml: missing" in line
    (ckpt / "config.toml").write_text("[model\nbroken")  # a torn write
    assert "config.toml: damaged" in _one_error_line(run_cli("train", "--resume", str(tmp_path / "run"), check=False))
    (ckpt / "state.json").write_text("{not json")
    (ckpt / "config.toml").unlink()
    line = _one_error_line(run_cli("train", "--resume", str(ckpt), check=False))
    assert "state.json: not a readable checkpoint state" in line
    # a path without a checkpoint is refused before a new --out is made
    r = run_cli("train", "--resume", str(ckpt.parent), "--out", str(tmp_path / "new"), check=False)
    line = _one_error_line(r, code=2)
    assert line.endswith(f"--resume {ckpt.parent}: no checkpoint there (expected a run directory with "
                         "checkpoints/step_* or a checkpoint directory with state.json)")
    assert not (tmp_path / "new").exists()


def test_bench_checks_every_preset_before_measuring():
    r = run_cli("bench", "--preset", "tiny-2025", "--vs", "no-such-preset", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "speedrun bench: error: unknown preset 'no-such-preset'; choose one of: "
        "baseline-tiny, gpt2-baseline, gpt2-medium-speedrun, gpt2-speedrun, gpt2-speedrun-2025, tiny, tiny-2025"]


def test_bench_needs_at_least_one_timed_step():
    r = run_cli("bench", "--preset", "tiny-2025", "--steps", "0", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "speedrun bench: error: --steps must be at least 1, --warmup and --at at least 0, got 0, 3 and 0"]


@pytest.mark.parametrize("args,error", [
    (["--at", "175", "--steps", "10"], "--at 175 --steps 10 times steps up to 184, past tiny's last step (179)"),
    (["--at", "115", "--steps", "10"], "--at 115 --steps 10: tiny's steps 115 and 124 lie in stages with other "
                                       "batches (1,024 and 2,048 tokens); time one stage"),
])
def test_bench_times_steps_of_one_stage_within_the_run(args, error):
    r = run_cli("bench", "--preset", "tiny", *args, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"speedrun bench: error: {error}"]
