import dataclasses
import subprocess
import sys
import tomllib
from importlib import resources

import pytest

from speedrun import config
from speedrun.stages import grad_accum, step_plan
from speedrun.config import (CONFIG_VERSION, Config, ConfigError, from_dict, load_config, preset_names,
                             scale_steps, to_dict, to_toml)


def test_every_preset_loads_and_round_trips_through_toml():
    assert {"tiny-2025", "baseline-tiny", "gpt2-speedrun-2025", "gpt2-medium-speedrun", "gpt2-baseline"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.description
        assert to_dict(from_dict(tomllib.loads(to_toml(cfg)))) == to_dict(cfg)


def test_gpt2_speedrun_carries_the_record_numbers():
    cfg = load_config("gpt2-speedrun-2025")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.head_dim, cfg.model.model_dim) == (12, 6, 128, 768)
    assert cfg.data.batch_tokens == 393216 and cfg.train.steps == 1770
    assert grad_accum(step_plan(0, cfg), cfg, 8) == 1 and grad_accum(step_plan(0, cfg), cfg, 1) == 8
    assert cfg.optim.adam_betas == [0.8, 0.95] and cfg.optim.adam_eps == 1e-10


def test_layering_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('base = "tiny-2025"\n[model]\nn_layer = 8\nlong_short_pattern = "LSSSSSSL"\n[train]\nsteps = 7\n')
    cfg = load_config(None, f, ["train.steps=9", "model.attention=sdpa", "optim.adam_betas=[0.9, 0.99]"])
    assert cfg.model.n_layer == 8 and cfg.train.steps == 9 and cfg.model.attention == "sdpa"
    assert cfg.optim.adam_betas == [0.9, 0.99]
    assert cfg.model.model_dim == load_config("tiny-2025").model.model_dim


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
        load_config("tiny-2025", None, [override])


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
    cfg = load_config("gpt2-speedrun-2025")
    scale_steps(cfg, 177)
    assert cfg.train.steps == 177
    assert cfg.optim.muon_momentum_warmup_steps == 30  # 300 of 1770
    assert cfg.train.val_every == 12 or cfg.train.val_every == 13


def test_world_size_that_does_not_divide_the_batch_is_refused():
    cfg = load_config("gpt2-speedrun-2025")
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        grad_accum(step_plan(0, cfg), cfg, 3)


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
    r = subprocess.run([sys.executable, "-m", "speedrun", "train", "--preset", "tiny-2025", "--set", override],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"speedrun train: error: {message}"]


# -- presets as deltas, config versions ----------------------------------------------------------

def _resolved(name: str) -> dict:
    return to_dict(load_config(name))


def test_defaults_are_a_plain_gpt2_with_every_technique_off():
    m, o = Config().model, Config().optim
    assert (m.activation, m.norm, m.positional, m.attention, m.fp8_head) == ("gelu", "layernorm", "learned", "sdpa", "off")
    assert not any([m.qk_norm, m.value_embeds, m.unet_skips, m.x0_mix, m.skip_attn_layers, m.zero_init_proj,
                    m.zero_init_head, m.logit_softcap, m.document_mask, m.sliding_window, m.bf16_embeddings])
    assert m.tied_head and m.bias and o.hidden_optimizer == "adam"
    baseline = _resolved("gpt2-baseline")
    assert baseline == {**to_dict(Config()), "description": baseline["description"],
                        "data": {**to_dict(Config())["data"], "dir": "data/fineweb10B"}}


@pytest.mark.parametrize("name", preset_names())
def test_presets_list_only_what_differs_from_their_base(name):
    """A key a preset restates from its base (or from the defaults) would hide a later change there."""
    table = tomllib.loads((resources.files("speedrun.presets") / f"{name}.toml").read_text())
    under = _resolved(table["base"]) if "base" in table else to_dict(Config())
    restated = [f"{s}.{k}" for s in config.SECTIONS for k, v in table.get(s, {}).items() if under[s][k] == v]
    assert not restated, f"{name} restates {restated}"


def test_a_preset_builds_on_its_base_chain():
    tiny, speedrun = load_config("tiny-2025"), load_config("gpt2-speedrun-2025")
    assert tiny.optim.hidden_optimizer == "muon" and tiny.model.qk_norm and tiny.model.attention == "flex"
    assert tiny.optim.lr_hidden == speedrun.optim.lr_hidden and tiny.model.n_layer == 6
    medium = load_config("gpt2-medium-speedrun")
    assert medium.model.value_embeds == 3 and medium.data.dir == "data/fineweb10B" and medium.model.n_layer == 16


def test_a_file_names_its_base_and_lists_only_changes(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "baseline-tiny"\n[model]\nn_layer = 4\n')
    cfg = load_config(None, f)
    assert to_dict(cfg) == {**_resolved("baseline-tiny"), "model": {**_resolved("baseline-tiny")["model"], "n_layer": 4}}
    f.write_text('preset = "tiny-2025"\n')  # the older spelling
    assert to_dict(load_config(None, f)) == _resolved("tiny-2025")
    f.write_text('base = "tiny-2025"\npreset = "tiny-2025"\n')
    with pytest.raises(ConfigError, match="mine.toml: give either 'base' or 'preset'"):
        load_config(None, f)
    f.write_text('base = "tinyy"\n')
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'"):
        load_config(None, f)


def test_a_loop_of_bases_is_one_error(monkeypatch):
    tables = {"a": {"base": "b"}, "b": {"base": "a"}}
    monkeypatch.setattr(config, "_preset_table", lambda name: tables[name])
    with pytest.raises(ConfigError, match="preset a: its bases form a loop"):
        load_config("a")


def test_saved_configs_carry_the_version():
    text = to_toml(load_config("tiny-2025"))
    assert text.startswith(f"version = {CONFIG_VERSION}\n")
    assert to_dict(load_config("tiny-2025"))["version"] == CONFIG_VERSION


V1_SPARSE = {"model": {"n_layer": 4, "long_short_pattern": "LSSL", "value_embeds": 1, "skip_attn_layers": []},
             "data": {"dir": ""}}


def test_a_saved_config_without_version_reads_with_version_1_defaults():
    """Version 1 saved configs had no version key and defaulted to the 2025 speedrun recipe."""
    cfg = from_dict(V1_SPARSE)
    record = load_config("gpt2-speedrun-2025")
    assert cfg.model.norm == "rms" and cfg.model.attention == "flex" and cfg.optim.hidden_optimizer == "muon"
    assert dataclasses.asdict(cfg.optim) == dataclasses.asdict(record.optim)
    assert from_dict({**V1_SPARSE, "version": 2}).model.norm == "layernorm"  # version 2: a plain GPT-2 underneath


def test_version_1_optimizer_keys_are_upgraded(tmp_path):
    adam = from_dict({"optim": {"muon": False, "lr_adam": 0.003, "lr_head": 0.5}})
    assert adam.optim.hidden_optimizer == "adam"
    assert (adam.optim.lr_hidden, adam.optim.lr_head, adam.optim.lr_embed, adam.optim.lr_scalar) == (0.003,) * 4
    muon = from_dict({"optim": {"muon": True, "muon_lr": 0.02}})
    assert (muon.optim.hidden_optimizer, muon.optim.lr_hidden) == ("muon", 0.02)
    f = tmp_path / "old.toml"
    f.write_text("[optim]\nmuon = false\nlr_adam = 0.003\n")  # a user file is read as the current version...
    with pytest.raises(ConfigError, match=r"old.toml: unknown key 'optim.muon' \(a config version 1 key.*version = 1"):
        load_config(None, f)
    f.write_text("version = 1\n[optim]\nmuon = false\nlr_adam = 0.003\n")  # ...unless it says otherwise
    assert load_config(None, f).optim.lr_embed == 0.003


@pytest.mark.parametrize("version, message", [(3, "written by a newer speedrun \\(config version 3"),
                                              ("2", "'version' must be a config version number"),
                                              (0, "'version' must be a config version number")])
def test_bad_versions_are_one_error(tmp_path, version, message):
    f = tmp_path / "c.toml"
    f.write_text(f"version = {version!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"c.toml: {message}"):
        load_config(None, f)


@pytest.mark.parametrize("base, optim, expected", [
    # a key the version-1 file leaves out keeps its base's value, as version 1 read it
    ("gpt2-medium-speedrun", "muon = true", ("muon", 0.025, 0.003, 0.3, 0.015)),
    ("baseline-tiny", "muon = false", ("adam", 0.003, 0.003, 0.003, 0.003)),
    ("baseline-tiny", "lr_adam = 0.001", ("adam", 0.001, 0.001, 0.001, 0.001)),
    # Muon mode over an Adam-only base: version 1's Muon-mode defaults, which that base never set
    ("baseline-tiny", "muon = true\nmuon_lr = 0.02", ("muon", 0.02, 0.008, 0.6, 0.04)),
])
def test_a_version_1_file_on_a_base_keeps_what_it_leaves_out(tmp_path, base, optim, expected):
    f = tmp_path / "old.toml"
    f.write_text(f'version = 1\nbase = "{base}"\n[optim]\n{optim}\n')
    o = load_config(None, f).optim
    assert (o.hidden_optimizer, o.lr_hidden, o.lr_head, o.lr_embed, o.lr_scalar) == expected


@pytest.mark.parametrize("text", ['base = "tiny-2025"\n[optim]\nmuon = false\n', "[optim]\nmuon = false\n",
                                  "[optim]\nmuon = false\nlr_adam = 0\n"])
def test_version_1_adam_mode_needs_its_lr_as_version_1_did(tmp_path, text):
    f = tmp_path / "old.toml"
    f.write_text("version = 1\n" + text)
    with pytest.raises(ConfigError, match="old.toml: 'optim.lr_adam' must be a positive number when optim.muon = false"):
        load_config(None, f)


@pytest.mark.parametrize("value,compile", [("true", True), ("false", False), ("auto", "auto"), ('"auto"', "auto")])
def test_train_compile_is_true_false_or_auto(value, compile):
    assert load_config("tiny", None, [f"train.compile={value}"]).train.compile == compile
    assert load_config("tiny").train.compile == "auto"


@pytest.mark.parametrize("value,message", [("maybe", "'train.compile' must be true, false or \"auto\"; got 'maybe'"),
                                           ("3", "'train.compile' must be true, false or a string, got 3")])
def test_train_compile_refuses_anything_else(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, [f"train.compile={value}"])


def test_head_pair_blocks_need_an_even_number_of_heads():
    # refused while loading, not when NorMuon first splits the qkv weight after the model is built
    with pytest.raises(ConfigError, match="'optim.qk_blocks' = head_pair .* even model.n_head, got 3"):
        load_config("tiny", None, ["model.model_dim=192", "model.n_head=3"])
