import subprocess
import sys

import pytest

from speedrun.config import (ConfigError, from_dict, grad_accum_steps, load_config, preset_names, scale_steps,
                             to_dict, to_toml)
import tomllib


def test_every_preset_loads_and_round_trips_through_toml():
    assert {"tiny", "baseline-tiny", "gpt2-speedrun", "gpt2-medium-speedrun", "gpt2-baseline"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.description
        assert to_dict(from_dict(tomllib.loads(to_toml(cfg)))) == to_dict(cfg)


def test_gpt2_speedrun_carries_the_record_numbers():
    cfg = load_config("gpt2-speedrun")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.head_dim, cfg.model.model_dim) == (12, 6, 128, 768)
    assert cfg.data.batch_tokens == 393216 and cfg.train.steps == 1770
    assert grad_accum_steps(cfg, 8) == 1 and grad_accum_steps(cfg, 1) == 8
    assert cfg.optim.adam_betas == [0.8, 0.95] and cfg.optim.adam_eps == 1e-10


def test_layering_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "tiny"\n[model]\nn_layer = 8\nlong_short_pattern = "LSSSSSSL"\n[train]\nsteps = 7\n')
    cfg = load_config(None, f, ["train.steps=9", "model.attention=sdpa", "optim.adam_betas=[0.9, 0.99]"])
    assert cfg.model.n_layer == 8 and cfg.train.steps == 9 and cfg.model.attention == "sdpa"
    assert cfg.optim.adam_betas == [0.9, 0.99]
    assert cfg.model.model_dim == load_config("tiny").model.model_dim


@pytest.mark.parametrize("override, message", [
    ("model.nope=1", "unknown key 'model.nope'"),
    ("bogus.x=1", "unknown key 'bogus'"),
    ("model.n_layer=four", "'model.n_layer' must be an integer"),
    ("model.qk_norm=1", "must be true or false"),
    ("model.attention=cuda", "'model.attention' must be one of"),
    ("data.batch_tokens=1000", "must be a multiple of"),
    ("noequals", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, [override])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(None, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(None, bad)


def test_scale_steps_keeps_schedule_fractions():
    cfg = load_config("gpt2-speedrun")
    scale_steps(cfg, 177)
    assert cfg.train.steps == 177
    assert cfg.optim.muon_momentum_warmup_steps == 30  # 300 of 1770
    assert cfg.train.val_every == 12 or cfg.train.val_every == 13


def test_world_size_that_does_not_divide_the_batch_is_refused():
    cfg = load_config("gpt2-speedrun")
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        grad_accum_steps(cfg, 3)


def test_cli_bad_value_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "speedrun", "train", "--set", "model.n_layer=x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["speedrun train: error: --set: 'model.n_layer' must be an integer, got 'x'"]


def test_cli_presets_lists_each_with_a_description():
    r = subprocess.run([sys.executable, "-m", "speedrun", "presets"], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(preset_names())
    assert all(len(line.split(None, 1)) == 2 for line in lines)


@pytest.mark.parametrize("override,message", [
    ("model.n_head=4", "'model.n_head' × 'model.head_dim' (4 × 64 = 256) must equal 'model.model_dim' (128)"),
    ("model.skip_attn_layers=[6]", "'model.skip_attn_layers' names layers [6] outside 0..5"),
    ("model.fp8_scales=[1.0, 2.0]", "'model.fp8_scales' must be three positive numbers [x, w, grad], got [1.0, 2.0]"),
])
def test_cli_shape_errors_are_one_line_before_any_work(override, message):
    """Shapes that cannot build a model are config errors (exit 2), not a traceback from the model."""
    r = subprocess.run([sys.executable, "-m", "speedrun", "train", "--preset", "tiny", "--set", override],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"speedrun train: error: {message}"]
