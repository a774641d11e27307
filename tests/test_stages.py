"""Training in stages (the 2026 record): `speedrun schedule --json` of gpt2-speedrun at every
stage boundary against the record's numbers (../shared/docs/record-2026.md §2.6, §2.7, §2.9),
scaling with --steps, the checks on [stages], and what the trainer derives from them."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_cli_here
from speedrun.config import ConfigError, load_config, scale_steps, to_dict
from speedrun.schedule import schedule_rows
from speedrun.stages import grad_accum, shape_steps, step_plan, tokens_before

PRESET = "gpt2-speedrun"


def record_lr(step: int) -> float:
    """§2.7 as the record computes it: a stage factor, then from step int(1270·0.4) = 508 a linear
    fall to 0.15 at step 1270, where the extension stays."""
    factor = 1.0 if step < 423 else 1.52 if step < 847 else 1.73
    if step >= 1270:
        return 0.15
    t = max(0.0, (step - 508) / 762)
    return factor * (1 - t) + 0.15 * t


def record_momentum(step: int) -> float:
    """§2.6: 0.85 → 0.95 over steps 0-300, back to 0.85 over the last 50 of the 1285 steps."""
    if step < 300:
        return 0.85 + step / 300 * 0.10
    if step > 1235:
        return 0.95 - (step - 1235) / 50 * 0.10
    return 0.95


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    report = json.loads(run_cli_here("schedule", "--preset", PRESET, "--json").stdout)
    assert report["steps"] == 1285 and len(report["rows"]) == 1286
    return report["rows"]


# step: (stage, tokens per step, sequence length, max document length, (short, long) window blocks)
BOUNDARIES = {
    0: (0, 131072, 16384, 896, (1, 3)), 422: (0, 131072, 16384, 896, (1, 3)),
    423: (1, 262144, 32768, 2048, (3, 7)), 846: (1, 262144, 32768, 2048, (3, 7)),
    847: (2, 393216, 49152, 2048, (5, 11)), 1269: (2, 393216, 49152, 2048, (5, 11)),
    1270: (3, 393216, 49152, 2048, (6, 13)), 1284: (3, 393216, 49152, 2048, (6, 13)),
    1285: (3, 393216, 49152, 2048, (6, 20)),  # the final validation: a long window of 20 blocks
}


@pytest.mark.parametrize("step", sorted(BOUNDARIES))
def test_stage_boundaries_are_the_records(rows, step):
    r = rows[step]
    stage, tokens, seq_len, max_doc, (short, long) = BOUNDARIES[step]
    assert (r["stage"], r["tokens_per_step"], r["seq_len"], r["max_doc_len"]) == (stage, tokens, seq_len, max_doc)
    assert (r["window_short_blocks"], r["window_long_blocks"]) == (short, long)
    assert (r["window_short_tokens"], r["window_long_tokens"]) == (short * 128, long * 128)
    assert r["lr"] == pytest.approx(record_lr(min(step, 1284)), abs=1e-12)
    if step < 1285:
        assert r["muon_momentum"] == pytest.approx(record_momentum(step), abs=1e-12)


def test_every_step_follows_the_records_lr_and_momentum(rows):
    for r in rows[:-1]:
        assert r["lr"] == pytest.approx(record_lr(r["step"]), abs=1e-12), r["step"]
        assert r["muon_momentum"] == pytest.approx(record_momentum(r["step"]), abs=1e-12), r["step"]


def test_table_prints_the_stages():
    out = run_cli_here("schedule", "--preset", PRESET).stdout
    assert "stages end at steps 423, 847, 1270; steps 1270..1284 are the extension stage 3" in out
    printed = {int(line.split()[0]) for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert {0, 423, 508, 847, 1235, 1270, 1285} <= printed


def test_steps_scales_the_stage_ends():
    cfg = load_config(PRESET)
    scale_steps(cfg, 257)  # a fifth of the run
    assert cfg.stages.ends == [85, 169, 254]
    assert cfg.optim.muon_momentum_cooldown_steps == 10 and cfg.optim.muon_momentum_warmup_steps == 60
    rows = json.loads(run_cli_here("schedule", "--preset", PRESET, "--steps", "257", "--json").stdout)["rows"]
    assert [rows[s]["stage"] for s in (84, 85, 168, 169, 253, 254, 256)] == [0, 1, 1, 2, 2, 3, 3]


def test_steps_fewer_than_the_stages_is_refused_and_an_empty_extension_is_said():
    cfg = load_config(PRESET)
    with pytest.raises(ConfigError, match=r"--steps 2 is too short for the 3 stages in stages.ends \[423, 847, 1270\]"):
        scale_steps(cfg, 2)
    out = run_cli_here("schedule", "--preset", PRESET, "--set", "train.steps=1270").stdout
    assert "stages end at steps 423, 847, 1270; no extension steps; the lr schedule spans the first 1270 steps" in out


def test_tokens_and_shapes_follow_the_stages():
    cfg = load_config(PRESET)
    assert tokens_before(1285, cfg) == 423 * 131072 + 424 * 262144 + 438 * 393216  # ≈ 339M, §0
    assert tokens_before(500, cfg) == 423 * 131072 + 77 * 262144
    assert shape_steps(cfg) == [0, 423, 847]  # the extension has stage 3's shape: nothing new to compile
    assert step_plan(1284, cfg).lr_factor == 1.0 and step_plan(900, cfg).lr_factor == 1.73


@pytest.mark.parametrize("override, message", [
    ("stages.lr=[1.0, 2.0]", "'stages.lr' must have 4 entries"),
    ("stages.ends=[423, 423, 1270]", "'stages.ends' must be ascending"),
    ("stages.ends=[423, 847, 1300]", "'stages.ends' must be ascending steps in 1..train.steps (1285)"),
    ("stages.windows=[[3, 1], [3, 7], [5, 11], [6, 13]]", "[short, long] in blocks with 0 < short <= long"),
    ("stages.final_windows=[20]", "[short, long] in blocks"),
    ("data.bos_aligned=false", "a maximum document length needs data.bos_aligned = true"),
    ("stages.seq_len=[16384, 32768, 49152, 49100]", "must be a multiple of model.window_block"),
    ("stages.batch_tokens=[131072, 262144, 393216, 100000]", "'stages.batch_tokens' (100000) must be a multiple"),
    ("model.sliding_window=false", "'stages.windows' and 'stages.final_windows' need model.sliding_window"),
])
def test_bad_stages_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(PRESET, overrides=[override])


@pytest.mark.parametrize("overrides, message", [
    (["optim.hidden_optimizer=muon"], "'optim.hidden_weight_dtype' = bfloat16 needs optim.hidden_optimizer = normuon"),
    (["optim.hidden_optimizer=adam", "optim.hidden_weight_dtype=float32"], "'optim.qk_blocks' = head_pair needs"),
    (["optim.hidden_optimizer=muon", "optim.hidden_weight_dtype=float32", "optim.qk_blocks=matrix"],
     "'optim.lr_mul_mlp_out' = 2.0 needs"),
    (["optim.hidden_optimizer=muon", "optim.hidden_weight_dtype=float32", "optim.qk_blocks=matrix",
      "optim.lr_mul_mlp_out=1.0"], "'optim.weight_decay_mode' = cautious needs optim.hidden_optimizer = normuon or adam"),
    (["optim.grad_clip=1.0"], "'optim.grad_clip' must be 0 with optim.hidden_optimizer = normuon"),
])
def test_normuon_only_switches_are_refused_elsewhere(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, overrides=overrides)


def test_stage_lists_need_ends():
    with pytest.raises(ConfigError, match="'stages.lr' needs 'stages.ends'"):
        load_config("tiny-2025", overrides=["stages.lr=[1.0]"])


# What the 2026 record's second part (the model and loss) adds to tiny beyond the first part's pieces
PART_2_KEYS = {"optim": {"lr_embed", "role_lr", "role_weight_decay", "role_adam_betas"},
               "stages": {"mtp_weights_start", "mtp_weights_end", "prefix_weight_start", "prefix_weight_end", "head_tied"}}


# what the sizing of tiny (docs/benchmarks.md, "Sizing tiny") changed after the ablation: its batches and length,
# and its third stage's one sequence of 2,048 tokens ("tiny's third stage as one sequence")
SIZING_KEYS = {"optim": {"muon_momentum_warmup_steps", "muon_momentum_cooldown_steps"},
               "stages": {"ends", "batch_tokens", "seq_len"}, "data": {"batch_tokens"}, "train": {"steps", "val_every"}}


def benchmark_script(name: str):
    """benchmarks/NAME.py imported as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_ends_at_tiny():
    """benchmarks/ablation_2026.py adds the first part's pieces one at a time to tiny-2025; all of them
    are tiny's optimizer, stages, data and training, apart from the second part's keys and the
    sizing's."""
    ablation = benchmark_script("ablation_2026")
    built = to_dict(load_config("tiny-2025", overrides=ablation.cumulative_overrides(len(ablation.PIECES) - 1)))
    preset = to_dict(load_config("tiny"))
    for section in ("optim", "stages", "data", "train"):
        keep = set(preset[section]) - PART_2_KEYS.get(section, set()) - SIZING_KEYS.get(section, set())
        assert {k: built[section][k] for k in keep} == {k: preset[section][k] for k in keep}, section


def test_every_sizing_variant_is_a_valid_config():
    """benchmarks/tiny_sizes.py's variants load as runs of tiny (its batch variants must still divide
    into the sequences of each stage after a change to tiny), each with the steps it asks for."""
    from speedrun.ablate import run_config

    sizes = benchmark_script("tiny_sizes")
    for name, args in sizes.VARIANTS.items():
        cfg = run_config(["--preset", "tiny", "--device", "cpu", *args])
        steps = args[args.index("--steps") + 1] if "--steps" in args else "180"
        assert cfg.train.steps == int(steps), name


def test_alternate_specs_are_labelled_variants_of_a_preset():
    """benchmarks/alternate.py's specs, as its docstring's equal-cadence comparison writes them: a
    label, a preset and train's --set overrides, on the CPU."""
    parse_spec = benchmark_script("alternate").parse_spec
    label, cfg = parse_spec("tiny@4k=tiny;stages.batch_tokens=[4096,4096,4096,4096];stages.seq_len=[1024,1024,1024,1024]")
    assert label == "tiny@4k" and cfg.train.device == "cpu"
    assert [step_plan(s, cfg).batch_tokens for s in (0, 179)] == [4096, 4096]
    assert grad_accum(step_plan(0, cfg), cfg, 1) == 4
    assert parse_spec("baseline-tiny")[0] == "baseline-tiny"
    assert parse_spec("baseline-tiny")[1].data.batch_tokens == 4096


def test_warm_up_steps_cover_every_batch_shape_still_to_come():
    """Two warm-up steps from the current step and from the first step of every later stage with a
    new graph: stage 1 (256 tokens, three multi-token weights, prefix loss), stage 2 (512 tokens,
    two weights, prefix loss), stage 3 (one weight, no prefix loss); the extension repeats stage 3's
    graph with the same sequences, which compiles nothing new."""
    from speedrun.distributed import setup
    from speedrun.train import Trainer

    record = load_config("gpt2-speedrun").stages  # the record's loss weights by stage
    cfg = load_config("tiny", overrides=["stages.seq_len=[256, 512, 512, 512]",
                                              "stages.batch_tokens=[512, 1024, 2048, 2048]", "train.compile=false",
                                              *(f"stages.{key}={getattr(record, key)}" for key in
                                                ("mtp_weights_start", "mtp_weights_end", "prefix_weight_start",
                                                 "prefix_weight_end"))])
    trainer = Trainer(cfg, setup("cpu"), "test")
    assert trainer.warm_up_steps(2) == [0, 1, 60, 61, 120, 121]
    trainer.step = 80  # resumed in stage 2: its own graph from here, then stage 3's
    assert trainer.warm_up_steps(2) == [80, 81, 120, 121]
    trainer.step = 10
    assert trainer.warm_up_steps(3) == [10, 11, 12, 60, 61, 62, 120, 121, 122]
    trainer.step = 130  # in stage 3: nothing new after
    assert trainer.warm_up_steps(2) == [130, 131]
    trainer.step = 179  # the last step: nothing past the run
    assert trainer.warm_up_steps(2) == [179]
    trainer.step = 0  # a benchmark of steps 0-59 or 0-60 (speedrun bench): only the shapes those use
    assert trainer.warm_up_steps(2, until=60) == [0, 1]
    assert trainer.warm_up_steps(2, until=61) == [0, 1, 60, 61]


def test_loss_weights_and_the_tied_head_follow_the_record_by_stage():
    """The record's ramps: within a stage t = (step - start) / (end - start), never 1; MTP
    [1, 0.5, 0.25 → 0], [1, 0.5 → 0], [1]; prefix 0.25, 0.25 → 0, 0; the head tied through step 847."""
    rows = schedule_rows(load_config(PRESET))
    ramp = lambda a, b, step, start, end: a + (b - a) * (step - start) / (end - start)  # noqa: E731
    for step in (0, 200, 422):
        assert rows[step]["mtp_weights"] == pytest.approx([1.0, 0.5, ramp(0.25, 0.0, step, 0, 423)])
        assert rows[step]["prefix_weight"] == 0.25
    for step in (423, 600, 846):
        assert rows[step]["mtp_weights"] == pytest.approx([1.0, ramp(0.5, 0.0, step, 423, 847)])
        assert rows[step]["prefix_weight"] == pytest.approx(ramp(0.25, 0.0, step, 423, 847))
    assert rows[847]["mtp_weights"] == rows[1284]["mtp_weights"] == [1.0]
    assert rows[847]["prefix_weight"] == 0.0
    assert [rows[s]["head_tied"] for s in (0, 846, 847, 848, 1284)] == [True, True, True, False, False]
