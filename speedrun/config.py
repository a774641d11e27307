"""Run configuration: typed dataclasses, filled from preset TOML files, a user TOML file and
`--set section.key=value` overrides, in that order. Configs are data; the code never branches on
a preset's name."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


from speedrun.errors import DataError, UsageError, first_line


class ConfigError(UsageError):
    """Bad configuration input; the message is one line naming the key or file."""


@dataclass
class ModelConfig:
    """A plain GPT-2 (nanoGPT's) with every speedrun technique off; presets turn them on."""
    vocab_size: int = 50257
    vocab_multiple: int = 128  # pad the head's rows so its matmul tiles evenly
    n_layer: int = 12
    n_head: int = 12
    head_dim: int = 64
    model_dim: int = 768
    mlp_ratio: int = 4
    activation: str = "gelu"  # gelu | relu2
    norm: str = "layernorm"  # layernorm (learned, nanoGPT) | rms (parameter-free)
    positional: str = "learned"  # learned | rotary
    max_seq_len: int = 1024  # only for learned positions
    rotary_base: float = 1024.0
    rotary_half_truncate: bool = True  # with rotary: rotate only half the head dims, the rest stay position-free
    qk_norm: bool = False
    attn_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    value_embeds: int = 0  # tables used in the first and last N layers; 0 disables
    unet_skips: bool = False
    x0_mix: bool = False  # mix rms_norm(embedding) into each block with learned scalars
    skip_attn_layers: list[int] = field(default_factory=list)
    tied_head: bool = True
    zero_init_proj: bool = False
    zero_init_head: bool = False
    bias: bool = True
    logit_softcap: float = 0.0  # 0 disables; logits = cap * sigmoid(logits / softcap_temperature)
    softcap_temperature: float = 7.5
    attention: str = "sdpa"  # sdpa (dense masks; short windows by query chunks) | flex (FlexAttention block masks)
    document_mask: bool = False  # documents split at BOS attend only within themselves
    sliding_window: bool = False
    window_min: int = 128  # tokens, at step 0
    window_max: int = 1792  # tokens, at the last step
    window_block: int = 128  # FlexAttention block size; windows grow in these steps
    # record: block·max(1, ceil((window_max - window_block/2)·t/T / window_block)), the 2025 record's
    # rule (1728·t/T rounded up to 128 for 1792); linear: window_min + ceil((window_max - window_min)·t/T),
    # rounded up to whole blocks
    window_schedule: str = "record"
    # block: a query block sees its nearest n key blocks (n = window/block, half for S layers, at
    # least one), document-causal inside them, as the record; token: query - key < window exactly;
    # varlen: query - key <= window, FlashAttention's window_size=(window, 0) (the 2026 record)
    window_granularity: str = "block"
    # one letter per layer: L = long window, S = window/2; empty: every layer L
    long_short_pattern: str = ""
    fp8_head: str = "off"  # off | on | auto (CUDA cc >= 8.9)
    fp8_scales: list[float] = field(default_factory=lambda: [2.0, 512.0, 524288.0])  # x, w, grad
    activation_dtype: str = "auto"  # auto (bfloat16 on CUDA and on CPUs with AVX-512 BF16 or AMX, else float32) | bfloat16 | float32; no autocast
    bf16_embeddings: bool = False  # with bfloat16 activations, store embedding tables in bf16 as the record does
    # The 2026 record's model (../shared/docs/record-2026.md §1 and §3; the codes E1.. name its
    # techniques there). Every key is off by default; docs/model.md says what each does.
    smear_gate: bool = False  # E1: e_t += λ·σ(w·e_t[:12])·e_(t-1), λ and w from zero
    bigram_vocab: int = 0  # E2: rows of the bigram hash table (record 377,280 = 50,304·15/2); 0: none
    bigram_sign_rows: int = 0  # E2: rows of the random ±1 table multiplying each bigram row (record 8,192); 0: none
    bigram_gate: float = 0.05  # E2: start value of the per-layer gates on the bigram term
    value_embed_layers: list[int] = field(default_factory=list)  # E3: one table per listed layer, gated per head
    value_embed_std: float = 0.01  # E3: init std of value_embed_layers' tables
    residual_scalars: bool = False  # E4: x <- r·x + p·f(x) per sublayer, r from √1.1, p from 1
    x0_gates: bool = False  # E5: + g·x0 after each attention sublayer, g from 0
    skip_connections: list[list[int]] = field(default_factory=list)  # R1: [from, to]: block `to` adds σ(ℓ)·g·(output of block `from`)
    attn_input_layer: int = -1  # R2: blocks after this one take rms(its output) as attention input; -1: none
    mudd: bool = False  # R3: per-token dense connections into the last block and after the loop
    gate_generators: bool = False  # R4: every gate per token from two small generators; false: each a learned constant
    gate_split_layer: int = 4  # R4: the second generator reads the residual stream entering this block
    rotary_pairs: str = "halves"  # A2: halves (dim i with i + D/2) | adjacent (2i with 2i+1, the 2026 record)
    yarn: bool = False  # A2: when the long window grows, stretch rotary's frequencies and raise the attention scale
    key_offset: bool = False  # A4: on long-window layers, the unrotated key dims come from the previous token
    paired_head_layers: list[int] = field(default_factory=list)  # A3: heads 2j and 2j+1 attend as one 2T-row sequence
    xsa_layers: list[int] = field(default_factory=list)  # A6: remove a gated share of each head's own value
    attn_gate_layers: list[int] = field(default_factory=list)  # A7: per-head output gates, from 0.25
    composable_layers: list[int] = field(default_factory=list)  # A8: heads mix post-softmax over a short window
    composable_window: int = 112  # A8: keys in the composable window (the query and the 111 before it)
    attn_lambdas: bool = False  # A5: learned scalars on the qkv (0.5) and output (1.0) weights, folded into them
    zero_init_attn_proj: bool = True  # with zero_init_proj: zero the attention output too (the 2026 record: false)
    softcap_shift: float = 0.0  # logits = logit_softcap·sigmoid((z + shift) / softcap_temperature) (2026: 5)
    head_init_std: float = 0.0  # > 0: the untied head starts N(0, std²) and the token embedding as its copy (E6)
    mlp_recompute: bool = False  # M1: keep only relu(xW)² for backward and recompute the rest
    fp8_mlp: str = "off"  # M2: off | on | auto (CUDA cc >= 8.9): both MLP matmuls in FP8 while training
    fp8_mlp_headroom: float = 1.8  # M2: the down projection's input scale is the previous step's amax × this

    def window_letter(self, layer: int) -> str:
        """`layer`'s long_short_pattern letter."""
        return self.long_short_pattern[layer] if self.long_short_pattern else "L"


@dataclass
class OptimConfig:
    """nanoGPT's AdamW with warm-up and cosine decay; presets switch the hidden matrices to Muon."""
    hidden_optimizer: str = "adam"  # the optimizer of the hidden matrices: adam | muon | normuon; every other role uses adam
    lr_hidden: float = 6e-4
    lr_head: float = 6e-4
    lr_embed: float = 6e-4
    lr_scalar: float = 6e-4
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 0  # back down to muon_momentum_start linearly over the run's last N steps
    muon_nesterov: bool = True
    ns_steps: int = 5
    # how Muon and NorMuon orthogonalise: newton_schulz (the 2025 quintic, ns_steps iterations) |
    # polar_express (the 2026 record: five iterations, each with its own coefficients)
    orthogonalizer: str = "newton_schulz"
    # its matmuls' dtype: auto (bfloat16, as the records, on CUDA and on CPUs with AVX-512 BF16 or
    # AMX; float32 on other CPUs, where bf16 matmuls are emulated and far slower) | bfloat16 | float32
    orthogonalize_dtype: str = "auto"
    normuon_beta2: float = 0.9  # NorMuon's second-moment decay (per row or column of the orthogonalised update)
    qk_blocks: str = "matrix"  # NorMuon: Q and K orthogonalised whole (matrix) or per pair of heads (head_pair)
    lr_mul_mlp_out: float = 1.0  # NorMuon's lr factor of the MLP output projection (the 2026 record: 2)
    # float32: the hidden matrices are fp32 parameters; bfloat16: bf16 parameters whose low 16 bits
    # NorMuon keeps in its state, so each update is applied to the exact fp32 value (the 2026 record)
    hidden_weight_dtype: str = "float32"
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # lr of the roles that have no lr_* key of their own (every role after "scalar" in config.ROLES);
    # those roles default to lr_scalar, adam_betas and no weight decay
    role_lr: dict[str, float] = field(default_factory=dict)
    adam_eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; vectors and scalars never decay
    # per-role overrides of weight_decay and adam_betas, e.g. {head = 0.75}; roles: hidden, head, embed, scalar
    role_weight_decay: dict[str, float] = field(default_factory=dict)
    role_adam_betas: dict[str, list[float]] = field(default_factory=dict)
    # decoupled: p -= lr·wd·p (AdamW, torch's Muon); cautious: only where the update and the weight
    # agree in sign, p -= lr·lr_eff·wd·p, decay proportional to lr squared (the 2026 record)
    weight_decay_mode: str = "decoupled"
    # Adam steps every N optimizer steps (at steps N-1, 2N-1, ...) on the sum of the N steps'
    # gradients, its bias correction counting its own updates (the 2026 record: 2)
    adam_update_every: int = 1
    grad_clip: float = 1.0  # 0 disables
    schedule: str = "cosine"  # cosine | trapezoid (constant then linear cooldown)
    warmup_steps: int = 700
    cooldown_frac: float = 0.4  # trapezoid: the last fraction of the run over which the lr falls
    final_lr_frac: float = 0.0


@dataclass
class DataConfig:
    dir: str = ""  # empty: the built-in corpus
    train_pattern: str = "*_train_*.bin"
    val_pattern: str = "*_val_*.bin"
    seq_len: int = 1024  # tokens in one sequence
    micro_batch_seqs: int = 64  # sequences per rank per forward/backward
    batch_tokens: int = 524288  # global tokens per optimizer step
    val_tokens: int = 10485760
    val_seq_len: int = 1024
    bos_aligned: bool = False
    max_doc_len: int = 0  # with bos_aligned: documents are cut to this many tokens (the tail dropped); 0: no limit
    # batch: a step's batch never spans two shards; when the next whole batch (and one more token)
    # does not fit, the rest of the shard is skipped, as the record's loader does.
    # sequence: only a sequence never spans two shards, so a batch may take the end of one shard
    # and the start of the next.
    shard_boundary: str = "batch"
    # a run needing more train tokens than the shards hold wraps around them; refused unless true
    allow_repeat: bool = False


@dataclass
class StageConfig:
    """Training in stages (the 2026 record): the run's first `ends[-1]` steps are split at `ends`, and
    the steps after the last end form one more, extension, stage. Every non-empty list has one entry
    per stage, extension included, and replaces the unstaged key it names; empty lists and empty
    `ends` leave the unstaged keys in force."""
    ends: list[int] = field(default_factory=list)  # exclusive end step of each scheduled stage, ascending
    lr: list[float] = field(default_factory=list)  # factor on every lr before the cooldown's floor (optim.final_lr_frac)
    batch_tokens: list[int] = field(default_factory=list)  # global tokens per optimizer step (data.batch_tokens)
    seq_len: list[int] = field(default_factory=list)  # tokens per sequence (data.seq_len)
    max_doc_len: list[int] = field(default_factory=list)  # documents cut to this many tokens (data.max_doc_len)
    windows: list[list[int]] = field(default_factory=list)  # [short, long] window in model.window_block blocks
    final_windows: list[int] = field(default_factory=list)  # [short, long] blocks for the final validation
    # multi-token prediction (L1): loss weights on the next token and the ones after it, at each stage's
    # first step and its last, linear in between; empty: next-token loss only
    mtp_weights_start: list[list[float]] = field(default_factory=list)
    mtp_weights_end: list[list[float]] = field(default_factory=list)
    # prefix-token loss (L2): weight at each stage's first and last step, linear in between; empty: none
    prefix_weight_start: list[float] = field(default_factory=list)
    prefix_weight_end: list[float] = field(default_factory=list)
    # E6: whether the head and the token embedding are one matrix in each stage; they untie once, at
    # the first Adam update of the first untied stage, the embedding taking the head's Adam moments
    head_tied: list[bool] = field(default_factory=list)


# the --compile flag's help, one text for every command that has the flag
COMPILE_HELP = ("torch.compile the whole model; --no-compile: eager (default: train.compile = auto, the model on "
                "CUDA and on CPU a few regions: the loss tail, q/k norm and rotation, the relu² backward, the Adam update)")


@dataclass
class TrainConfig:
    steps: int = 19073  # llm.c's GPT-2 (124M): 10B tokens in steps of 524,288
    val_every: int = 250  # 0: only at the end
    seed: int = 0
    # true: torch.compile the model; false: eager; "auto": the model on CUDA, on CPU only a few small
    # regions, the loss tail first (speedrun.prepare.compile_scope says which and why)
    compile: bool | str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    warmup_steps_untimed: int = 10  # compile warm-up steps whose effects are undone
    log_every: int = 1  # steps between fetches of the losses from the device (a host sync); every step is logged
    save_every: int = 0
    keep: int = 2
    target_val_loss: float = 3.28


@dataclass
class Config:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = ("model", "optim", "data", "stages", "train")
# The optimizer roles parameters are sorted into (GPT.param_groups), in the order of their groups.
# Roles after "scalar" are tagged on their parameters by the modules that own them (GPT.param_groups).
ROLES = ("hidden", "head", "embed", "scalar", "value_embed", "gate", "smear", "resid", "branch", "mudd", "mudd_bias",
         "gate_gen", "gate_gen_bias")

# Version 2: the dataclass defaults are a plain GPT-2 and presets build on one another with `base`.
# Version 1 (no `version` key; written before 2026-11-26): defaults were the 2025 speedrun recipe,
# and the optimizer was chosen by optim.muon / muon_lr / lr_adam.
CONFIG_VERSION = 2
V1_OPTIM_KEYS = ("muon", "muon_lr", "lr_adam")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("speedrun.presets").iterdir() if p.name.endswith(".toml"))


def _preset_table(name: str) -> dict:
    if name not in preset_names():  # checked first: a name is never a path (too long, '../x', ...)
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())}")
    return tomllib.loads((resources.files("speedrun.presets") / f"{name}.toml").read_text())


def _base_name(table: dict, where: str) -> str | None:
    """The preset a table builds on: `base = "NAME"` (`preset = "NAME"`, the older spelling, is read too)."""
    names = [table[k] for k in ("base", "preset") if k in table]
    if len(names) > 1:
        raise ConfigError(f"{where}: give either 'base' or 'preset', not both")
    if names and not isinstance(names[0], str):
        raise ConfigError(f"{where}: 'base' must be a preset name, got {names[0]!r}")
    return names[0] if names else None


def _chain(name: str) -> list[tuple[str, dict]]:
    """(where, table) of preset `name` and of every preset under it, the deepest base first."""
    chain: list[tuple[str, dict]] = []
    while name is not None:
        if any(where == f"preset {name}" for where, _ in chain):
            raise ConfigError(f"preset {name}: its bases form a loop ({' -> '.join(w[7:] for w, _ in chain)} -> {name})")
        table = _preset_table(name)
        chain.append((f"preset {name}", table))
        name = _base_name(table, f"preset {name}")
    return chain[::-1]


def _coerce(key: str, value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table such as {{head = ...}}, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(f"{key}.{k}", v, item, where) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(key, v, item, where) for v in value]
    if hint == bool | str:  # true, false or a word (train.compile's "auto"; validate checks which)
        if not isinstance(value, (bool, str)):
            raise ConfigError(f"{where}: '{key}' must be true, false or a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{where}: '{key}' is out of range, got {value!r:.40}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r:.40}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: '{key}' has an unsupported type")


def _apply(cfg: Config, table: dict, where: str) -> None:
    for key, value in table.items():
        if key == "description":
            cfg.description = _coerce(key, value, str, where)
            continue
        if key in ("base", "preset", "version"):  # read by _layers
            continue
        if key not in SECTIONS or not isinstance(value, dict):
            raise ConfigError(f"{where}: unknown key '{key}'; expected a [model], [optim], [data], [stages] or [train] table")
        section = getattr(cfg, key)
        hints = typing.get_type_hints(type(section))
        for sub, subvalue in value.items():
            if sub not in hints:
                hint = (" (a config version 1 key, now optim.hidden_optimizer and optim.lr_*; put version = 1 at the "
                        "top of the file to read it as written)") if key == "optim" and sub in V1_OPTIM_KEYS else ""
                raise ConfigError(f"{where}: unknown key '{key}.{sub}'{hint}")
            setattr(section, sub, _coerce(f"{key}.{sub}", subvalue, hints[sub], where))


def _version(table: dict, where: str, default: int) -> int:
    version = table.get("version", default)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{where}: 'version' must be a config version number, got {version!r:.40}")
    if version > CONFIG_VERSION:
        raise ConfigError(f"{where}: written by a newer speedrun (config version {version}; this one reads up to "
                          f"{CONFIG_VERSION}); upgrade speedrun to use it")
    return version


def _upgraded_v1(table: dict, where: str, under_muon: bool) -> dict:
    """A version-1 table in version-2 keys. Version 1's optim.muon chose Muon (at muon_lr) for the
    hidden matrices and Adam for the rest; muon = false put every parameter in one AdamW at lr_adam,
    which had to be positive. A key the table leaves out keeps the value of what lies under it
    (`under_muon`: whether that is in Muon mode). A pattern of only L layers is the empty pattern,
    so that it compares equal to the presets that now omit it."""
    model = table.get("model")
    if isinstance(model, dict) and isinstance(model.get("long_short_pattern"), str) \
            and set(model["long_short_pattern"]) == {"L"}:
        table = {**table, "model": {**model, "long_short_pattern": ""}}  # version 2 writes all-long as empty
    optim = table.get("optim")
    if not isinstance(optim, dict):
        return table
    optim = dict(optim)
    muon = _coerce("optim.muon", optim.pop("muon"), bool, where) if "muon" in optim else under_muon
    muon_lr, lr_adam = optim.pop("muon_lr", None), optim.pop("lr_adam", None)
    optim["hidden_optimizer"] = "muon" if muon else "adam"
    if muon:
        if not under_muon:  # an Adam-only base set none of Muon mode's lrs: version 1's defaults did
            optim = {**{k: v for k, v in _v1_defaults()["optim"].items() if k.startswith("lr_")}, **optim}
        if muon_lr is not None:
            optim["lr_hidden"] = muon_lr
    elif lr_adam is not None or under_muon:
        if lr_adam is None or isinstance(lr_adam, bool) or not isinstance(lr_adam, (int, float)) or lr_adam <= 0:
            raise ConfigError(f"{where}: 'optim.lr_adam' must be a positive number when optim.muon = false "
                              f"(config version 1), got {lr_adam!r}")
        optim.update(lr_hidden=lr_adam, lr_head=lr_adam, lr_embed=lr_adam, lr_scalar=lr_adam)
    return {**table, "optim": optim}


def _v1_defaults() -> dict:
    return tomllib.loads((resources.files("speedrun") / "config_versions" / "1.toml").read_text())


def _layers(table: dict, where: str, preset: str | None, default_version: int) -> list[tuple[str, dict]]:
    """(where, table) to apply over the dataclass defaults, in order: the preset chain (`preset`, or
    the table's own base), then the table, read in its config version."""
    preset = preset or _base_name(table, where)
    layers = _chain(preset) if preset is not None else []
    if _version(table, where, default_version) == 1:
        if preset is None:  # version 1's defaults were the speedrun recipe
            layers.append(("config version 1 defaults", _v1_defaults()))
        under = Config()
        for layer_where, layer in layers:
            _apply(under, layer, layer_where)
        table = _upgraded_v1(table, where, under.optim.hidden_optimizer == "muon")
    return [*layers, (where, table)]


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file (give its config.toml)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a TOML config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, integers over 4300 digits, deep nesting
        raise ConfigError(f"{path}: not valid TOML ({first_line(e)})") from None


def _parse_override(text: str) -> tuple[str, str, object]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set '{text}': expected section.key=value, e.g. model.n_layer=4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set model.attention=sdpa
    return parts[0], parts[1], value


def load_config(preset: str | None = None, file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < preset (its bases first) < file < overrides. A file may name its own base with
    `base = "..."`; without `version` it is read as the current config version."""
    if file is not None:
        layers = _layers(_read_toml(Path(file)), str(file), preset, CONFIG_VERSION)
    else:
        layers = _chain(preset) if preset is not None else []
    layers += [("--set", {section: {key: value}}) for section, key, value in map(_parse_override, overrides)]
    cfg = Config()
    for where, table in layers:
        _apply(cfg, table, where)
    validate(cfg)
    return cfg


def default_preset() -> str:
    """The preset of a command given neither --preset nor --config: the record's with a CUDA device,
    else tiny."""
    import torch  # here, not at the top: the CLI imports this module for every command

    return "gpt2-speedrun" if torch.cuda.is_available() else "tiny"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--preset, --config and --set, as `speedrun train` takes them, for a command that builds a run's
    config with config_from_args."""
    p.add_argument("--preset", help="preset name (see `speedrun presets`; default: gpt2-speedrun with a CUDA device, "
                                    "else tiny)")
    p.add_argument("--config", metavar="FILE",
                   help='a TOML config file (may name the preset it builds on with base = "...")')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set model.n_layer=4 (repeatable)")


def config_from_args(args: argparse.Namespace, flag_keys: dict[str, str] | None = None) -> Config:
    """The config that add_config_arguments' options name (default_preset where neither --preset nor
    --config is given), then every flag of `flag_keys` (flag: the one config key it stands for) that
    the command line gives."""
    preset = default_preset() if args.preset is None and args.config is None else args.preset
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in (flag_keys or {}).items()
             if getattr(args, flag) is not None]
    return load_config(preset, args.config, [*args.set, *flags])


def scale_steps(cfg: Config, steps: int) -> None:
    """Shorten or lengthen a run: every step-counted schedule keeps its fraction of the run.
    (The lr cooldown and window growth are already fractions.)"""
    if steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps}")
    ratio = steps / cfg.train.steps
    cfg.optim.muon_momentum_warmup_steps = round(cfg.optim.muon_momentum_warmup_steps * ratio)
    cfg.optim.muon_momentum_cooldown_steps = round(cfg.optim.muon_momentum_cooldown_steps * ratio)
    # Stage ends keep their fraction of the run, and stay ascending and at least one step apart.
    if steps < len(cfg.stages.ends):
        raise ConfigError(f"--steps {steps} is too short for the {len(cfg.stages.ends)} stages in stages.ends "
                          f"{cfg.stages.ends}: give at least {len(cfg.stages.ends)}")
    ends = []
    for end in cfg.stages.ends:
        ends.append(min(steps, max(round(end * ratio), ends[-1] + 1 if ends else 1)))
    cfg.stages.ends = ends
    cfg.optim.warmup_steps = round(cfg.optim.warmup_steps * ratio)
    if cfg.train.val_every > 0:
        cfg.train.val_every = max(1, round(cfg.train.val_every * ratio))
    cfg.train.steps = steps


_CHOICES = {
    ("model", "activation"): ("relu2", "gelu"),
    ("model", "norm"): ("rms", "layernorm"),
    ("model", "positional"): ("rotary", "learned"),
    ("model", "attention"): ("flex", "sdpa"),
    ("model", "fp8_head"): ("auto", "on", "off"),
    ("model", "window_schedule"): ("record", "linear"),
    ("model", "window_granularity"): ("block", "token", "varlen"),
    ("model", "activation_dtype"): ("auto", "bfloat16", "float32"),
    ("model", "rotary_pairs"): ("halves", "adjacent"),
    ("model", "fp8_mlp"): ("auto", "on", "off"),
    ("data", "shard_boundary"): ("batch", "sequence"),
    ("optim", "schedule"): ("trapezoid", "cosine"),
    ("optim", "hidden_optimizer"): ("muon", "normuon", "adam"),
    ("optim", "orthogonalizer"): ("newton_schulz", "polar_express"),
    ("optim", "orthogonalize_dtype"): ("auto", "bfloat16", "float32"),
    ("optim", "qk_blocks"): ("matrix", "head_pair"),
    ("optim", "weight_decay_mode"): ("decoupled", "cautious"),
    ("optim", "hidden_weight_dtype"): ("float32", "bfloat16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
}


def validate(cfg: Config) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"'{section}.{key}' must be one of {', '.join(allowed)}; got '{value}'")
    m, d, t = cfg.model, cfg.data, cfg.train
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"'train.compile' must be true, false or \"auto\"; got '{t.compile}'")
    positive = [("model.n_layer", m.n_layer), ("model.n_head", m.n_head), ("model.head_dim", m.head_dim),
                ("model.model_dim", m.model_dim), ("data.seq_len", d.seq_len), ("data.micro_batch_seqs", d.micro_batch_seqs),
                ("data.batch_tokens", d.batch_tokens), ("data.val_tokens", d.val_tokens), ("data.val_seq_len", d.val_seq_len),
                ("train.steps", t.steps)]
    for name, value in positive:
        if value <= 0:
            raise ConfigError(f"'{name}' must be positive, got {value}")
    for name in ("val_every", "save_every", "keep", "warmup_steps_untimed", "log_every"):
        if getattr(t, name) < 0 or (name == "log_every" and t.log_every == 0):
            raise ConfigError(f"'train.{name}' must be {'positive' if name == 'log_every' else 'zero or positive'}, "
                              f"got {getattr(t, name)}")
    if d.batch_tokens % (d.seq_len * d.micro_batch_seqs):
        raise ConfigError(f"'data.batch_tokens' ({d.batch_tokens}) must be a multiple of data.seq_len × data.micro_batch_seqs "
                          f"({d.seq_len * d.micro_batch_seqs})")
    if m.attention == "flex" and m.window_block > 0 and d.seq_len % m.window_block:  # <= 0: refused below
        raise ConfigError(f"'data.seq_len' ({d.seq_len}) must be a multiple of model.window_block ({m.window_block}) for flex attention")
    if m.long_short_pattern and (set(m.long_short_pattern) - {"L", "S"} or len(m.long_short_pattern) != m.n_layer):
        raise ConfigError(f"'model.long_short_pattern' must be {m.n_layer} letters L or S (one per layer), or empty "
                          f"for all L, got '{m.long_short_pattern}'")
    _validate_model_shapes(m)
    _validate_model_2026(m)
    _validate_ranges(cfg)
    _validate_stages(cfg)
    _validate_optim(cfg.optim)
    if cfg.optim.qk_blocks == "head_pair" and m.n_head % 2:
        raise ConfigError(f"'optim.qk_blocks' = head_pair orthogonalises Q and K by pairs of heads and needs an even "
                          f"model.n_head, got {m.n_head}")
    if m.value_embeds * 2 > m.n_layer:
        raise ConfigError(f"'model.value_embeds' ({m.value_embeds}) needs at least twice as many layers, got {m.n_layer}")
    if m.positional == "learned" and d.seq_len > m.max_seq_len:
        raise ConfigError(f"'data.seq_len' ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}) for learned positions")


def _validate_model_shapes(m: ModelConfig) -> None:
    """Shapes that cannot build a model, caught here so they end in one line rather than a traceback."""
    for name in ("vocab_size", "vocab_multiple", "mlp_ratio", "window_block"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"'model.{name}' must be positive, got {getattr(m, name)}")
    if m.n_head * m.head_dim != m.model_dim:
        raise ConfigError(f"'model.n_head' × 'model.head_dim' ({m.n_head} × {m.head_dim} = {m.n_head * m.head_dim}) "
                          f"must equal 'model.model_dim' ({m.model_dim})")
    if m.positional == "rotary" and m.head_dim % 2:
        raise ConfigError(f"'model.head_dim' ({m.head_dim}) must be even for rotary embeddings")
    if m.tied_head and m.zero_init_head:
        raise ConfigError("'model.zero_init_head' cannot be true with 'model.tied_head': it would zero the token embeddings")
    bad = [i for i in m.skip_attn_layers if not 0 <= i < m.n_layer]
    if bad:
        raise ConfigError(f"'model.skip_attn_layers' names layers {bad} outside 0..{m.n_layer - 1}")
    if len(m.fp8_scales) != 3 or min(m.fp8_scales) <= 0:
        raise ConfigError(f"'model.fp8_scales' must be three positive numbers [x, w, grad], got {m.fp8_scales}")
    if m.sliding_window and not 0 < m.window_min <= m.window_max:
        raise ConfigError(f"'model.window_min' ({m.window_min}) and 'model.window_max' ({m.window_max}) must satisfy "
                          "0 < window_min <= window_max")


def _validate_model_2026(m: ModelConfig) -> None:
    """The 2026 record's per-layer switches name layers that exist and can take them."""
    attention = [i for i in range(m.n_layer) if i not in m.skip_attn_layers]
    for key in ("value_embed_layers", "paired_head_layers", "xsa_layers", "attn_gate_layers", "composable_layers"):
        bad = [i for i in getattr(m, key) if i not in attention]
        if bad:
            raise ConfigError(f"'model.{key}' names layers {bad} that have no attention (layers with attention: {attention})")
    for key in ("xsa_layers", "composable_layers"):
        both = sorted(set(getattr(m, key)) & set(m.paired_head_layers))
        if both:
            raise ConfigError(f"'model.{key}' and 'model.paired_head_layers' share layers {both}; a paired layer's "
                              "values do not line up with its queries")
    if m.paired_head_layers and m.n_head % 2:
        raise ConfigError(f"'model.paired_head_layers' needs an even model.n_head, got {m.n_head}")
    if m.value_embed_layers and m.value_embeds:
        raise ConfigError("give 'model.value_embed_layers' or 'model.value_embeds', not both")
    for pair in m.skip_connections:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] < m.n_layer:
            raise ConfigError(f"'model.skip_connections' entries must be [from, to] with 0 <= from < to < {m.n_layer}, got {pair}")
    if not -1 <= m.attn_input_layer < m.n_layer - 1:
        raise ConfigError(f"'model.attn_input_layer' must be -1 or a layer before the last, got {m.attn_input_layer}")
    if m.bigram_sign_rows and not m.bigram_vocab:
        raise ConfigError("'model.bigram_sign_rows' needs model.bigram_vocab > 0")
    if m.bigram_vocab < 0 or m.bigram_sign_rows < 0 or m.composable_window <= 0:
        raise ConfigError("'model.bigram_vocab' and 'model.bigram_sign_rows' must be zero or positive, "
                          "'model.composable_window' positive")
    if (m.rotary_pairs != "halves" or m.yarn or m.key_offset or m.paired_head_layers) and m.positional != "rotary":
        raise ConfigError("'model.rotary_pairs', 'model.yarn', 'model.key_offset' and 'model.paired_head_layers' "
                          "need model.positional = rotary")
    if (m.mlp_recompute or m.fp8_mlp != "off") and m.activation != "relu2":
        raise ConfigError("'model.mlp_recompute' and 'model.fp8_mlp' need model.activation = relu2")
    if m.fp8_mlp_headroom <= 0 or m.value_embed_std <= 0:
        raise ConfigError("'model.fp8_mlp_headroom' and 'model.value_embed_std' must be positive")
    if m.mudd and m.attn_input_layer < 0:
        raise ConfigError("'model.mudd' needs model.attn_input_layer (the saved activation it mixes in)")
    if m.gate_generators and not 0 < m.gate_split_layer < m.n_layer:
        raise ConfigError(f"'model.gate_split_layer' must be in 1..{m.n_layer - 1}, got {m.gate_split_layer}")
    if m.head_init_std and m.tied_head:
        raise ConfigError("'model.head_init_std' is for an untied head (model.tied_head = false); "
                          "stages.head_tied ties it for some stages")


def _validate_optim(o: OptimConfig) -> None:
    """Switches that only NorMuon reads, refused with any other optimizer rather than ignored (Muon
    stays the 2025 record's; cautious decay is also Adam's, so only Muon refuses it)."""
    for key, value, default in (("hidden_weight_dtype", o.hidden_weight_dtype, "float32"),
                                ("qk_blocks", o.qk_blocks, "matrix"), ("lr_mul_mlp_out", o.lr_mul_mlp_out, 1.0)):
        if value != default and o.hidden_optimizer != "normuon":
            raise ConfigError(f"'optim.{key}' = {value} needs optim.hidden_optimizer = normuon "
                              f"(got {o.hidden_optimizer})")
    if o.hidden_optimizer == "normuon" and o.grad_clip > 0:
        raise ConfigError("'optim.grad_clip' must be 0 with optim.hidden_optimizer = normuon: NorMuon reduce-scatters "
                          "the hidden matrices' gradients inside its step, after clipping would have run (the record "
                          "does not clip)")
    if o.weight_decay_mode == "cautious" and o.hidden_optimizer == "muon":
        raise ConfigError("'optim.weight_decay_mode' = cautious needs optim.hidden_optimizer = normuon or adam "
                          "(Muon decays as torch.optim.Muon does)")


def _validate_stages(cfg: Config) -> None:
    s, t = cfg.stages, cfg.train
    lists = {k: getattr(s, k) for k in ("lr", "batch_tokens", "seq_len", "max_doc_len", "windows", "mtp_weights_start",
                                        "mtp_weights_end", "prefix_weight_start", "prefix_weight_end", "head_tied")}
    if not s.ends:
        named = [k for k, v in lists.items() if v]
        if named:
            raise ConfigError(f"'stages.{named[0]}' needs 'stages.ends' (the step each stage ends at)")
    elif any(b <= a for a, b in zip([0, *s.ends], s.ends)) or s.ends[-1] > t.steps:
        raise ConfigError(f"'stages.ends' must be ascending steps in 1..train.steps ({t.steps}), got {s.ends}")
    for key, values in lists.items():
        if values and len(values) != len(s.ends) + 1:
            raise ConfigError(f"'stages.{key}' must have {len(s.ends) + 1} entries (one per stage in stages.ends and "
                              f"one for the extension stage after it), got {len(values)}")
    pairs = [("stages.windows", w) for w in s.windows] + ([("stages.final_windows", s.final_windows)] if s.final_windows else [])
    for name, pair in pairs:
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise ConfigError(f"'{name}' entries must be [short, long] in blocks with 0 < short <= long, got {pair}")
    if cfg.model.yarn and not s.windows:
        raise ConfigError("'model.yarn' needs 'stages.windows' (YaRN follows the stages' long windows)")
    if cfg.model.key_offset and any(cfg.model.window_letter(i) == "L" for i in cfg.model.paired_head_layers):
        raise ConfigError("'model.key_offset' applies to long-window layers, which must not be in model.paired_head_layers")
    if (s.windows or s.final_windows) and not cfg.model.sliding_window:
        raise ConfigError("'stages.windows' and 'stages.final_windows' need model.sliding_window = true")
    for name, values in (("lr", s.lr), ("batch_tokens", s.batch_tokens), ("seq_len", s.seq_len)):
        if any(v <= 0 for v in values):
            raise ConfigError(f"'stages.{name}' entries must be positive, got {values}")
    if any(v < 0 for v in s.max_doc_len) or cfg.data.max_doc_len < 0:
        raise ConfigError("'data.max_doc_len' and 'stages.max_doc_len' must be zero (no limit) or positive")
    for name in ("mtp_weights", "prefix_weight"):
        start, end = getattr(s, f"{name}_start"), getattr(s, f"{name}_end")
        if bool(start) != bool(end) or any(len(a) != len(b) for a, b in zip(start, end) if isinstance(a, list)):
            raise ConfigError(f"'stages.{name}_start' and 'stages.{name}_end' must be given together, entries of equal length")
    if any(not w or w[0] <= 0 for w in s.mtp_weights_start + s.mtp_weights_end):
        raise ConfigError("'stages.mtp_weights_*' entries must start with a positive next-token weight")
    if s.head_tied and (cfg.model.tied_head or not cfg.model.head_init_std):
        raise ConfigError("'stages.head_tied' needs model.tied_head = false and model.head_init_std > 0 "
                          "(the embedding starts as the head's copy)")
    if any(s.head_tied) and cfg.model.bf16_embeddings:
        raise ConfigError("'model.bf16_embeddings' must be false with 'stages.head_tied': the tied token embedding "
                          "keeps the head's float32 (with bf16 activations the first tied step would fail)")
    if s.head_tied and any(a < b for a, b in zip(s.head_tied, s.head_tied[1:])):
        raise ConfigError(f"'stages.head_tied' can untie once and never tie again, got {s.head_tied}")
    m = cfg.model
    for seq in s.seq_len:
        if m.attention == "flex" and seq % m.window_block:
            raise ConfigError(f"'stages.seq_len' ({seq}) must be a multiple of model.window_block ({m.window_block}) "
                              "for flex attention")
        if m.positional == "learned" and seq > m.max_seq_len:
            raise ConfigError(f"'stages.seq_len' ({seq}) exceeds model.max_seq_len ({m.max_seq_len}) for learned positions")
    if (s.max_doc_len or cfg.data.max_doc_len) and not cfg.data.bos_aligned:
        raise ConfigError("a maximum document length needs data.bos_aligned = true")
    for tokens, seq in zip(s.batch_tokens or [cfg.data.batch_tokens] * (len(s.ends) + 1),
                           s.seq_len or [cfg.data.seq_len] * (len(s.ends) + 1)):
        if tokens % (seq * cfg.data.micro_batch_seqs):
            raise ConfigError(f"'stages.batch_tokens' ({tokens}) must be a multiple of the stage's sequence length × "
                              f"data.micro_batch_seqs ({seq * cfg.data.micro_batch_seqs})")


def _validate_ranges(cfg: Config) -> None:
    """Numbers outside the range where they mean anything: learning rates and other magnitudes must
    not be negative, fractions lie in [0, 1] and momenta and betas in [0, 1)."""
    o, m = cfg.optim, cfg.model
    checks = [(f"optim.{k}", getattr(o, k), 0.0, None) for k in
              ("lr_hidden", "lr_head", "lr_embed", "lr_scalar", "weight_decay", "grad_clip")]
    checks += [(f"optim.{k}", getattr(o, k), 0, None) for k in ("warmup_steps", "muon_momentum_warmup_steps",
                                                                "muon_momentum_cooldown_steps")]
    checks += [("optim.adam_update_every", o.adam_update_every, 1, None), ("optim.lr_mul_mlp_out", o.lr_mul_mlp_out, 0.0, None)]
    checks += [(f"optim.role_weight_decay.{k}", v, 0.0, None) for k, v in o.role_weight_decay.items()]
    checks += [(f"optim.{k}", getattr(o, k), 0.0, 1.0) for k in ("cooldown_frac", "final_lr_frac")]
    checks += [("model.logit_softcap", m.logit_softcap, 0.0, None), ("model.attn_scale", m.attn_scale, 0.0, None),
               ("optim.ns_steps", o.ns_steps, 1, None)]
    for name, value, low, high in checks:
        if value < low or (high is not None and value > high):
            where = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise ConfigError(f"'{name}' must be {where}, got {value}")
    below_one = [("optim.muon_momentum", o.muon_momentum), ("optim.muon_momentum_start", o.muon_momentum_start)]
    below_one += [(f"optim.adam_betas[{i}]", b) for i, b in enumerate(o.adam_betas)]
    below_one += [(f"optim.role_adam_betas.{k}[{i}]", b) for k, v in o.role_adam_betas.items() for i, b in enumerate(v)]
    below_one += [("optim.normuon_beta2", o.normuon_beta2)]
    checks_lr = [(f"optim.role_lr.{k}", v) for k, v in o.role_lr.items() if v < 0]
    if checks_lr:
        raise ConfigError(f"'{checks_lr[0][0]}' must be at least 0, got {checks_lr[0][1]}")
    for key in ("role_weight_decay", "role_adam_betas", "role_lr"):
        unknown = sorted(set(getattr(o, key)) - set(ROLES))
        if unknown:
            raise ConfigError(f"'optim.{key}' names unknown role '{unknown[0]}'; roles are {', '.join(ROLES)}")
    if any(len(v) != 2 for v in o.role_adam_betas.values()):
        raise ConfigError(f"'optim.role_adam_betas' entries must be two numbers, got {o.role_adam_betas}")
    for name, value in below_one:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"'{name}' must be in [0, 1), got {value}")
    if len(o.adam_betas) != 2:
        raise ConfigError(f"'optim.adam_betas' must be two numbers, got {o.adam_betas}")
    positive = [("optim.adam_eps", o.adam_eps), ("model.softcap_temperature", m.softcap_temperature),
                ("model.rotary_base", m.rotary_base)]
    for name, value in positive:
        if value <= 0:
            raise ConfigError(f"'{name}' must be positive, got {value}")


def to_dict(cfg: Config) -> dict:
    return {"version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def to_toml(cfg: Config) -> str:
    """Every key, resolved: a saved config does not depend on presets that may change later."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    d = to_dict(cfg)
    lines = [f"version = {d.pop('version')}", f"description = {fmt(d.pop('description'))}"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n"


def from_dict(table: dict, where: str = "config") -> Config:
    """A config saved by a run (config.toml, config.json); one without `version` was saved by
    config version 1 and is read with that version's defaults and keys. A table that is not a
    valid config is a damaged file: a DataError naming `where`, whatever value the damage hit."""
    try:
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of [model], [optim], [data] and [train] settings, "
                              f"got {type(table).__name__}")
        cfg = Config()
        for layer_where, layer in _layers(table, where, None, default_version=1):
            _apply(cfg, layer, layer_where)
        validate(cfg)
        return cfg
    except ConfigError as e:
        raise DataError(str(e) if str(e).startswith(where) else f"{where}: damaged ({e})") from None


def preset_description(name: str) -> str:
    return _preset_table(name).get("description", "")
