"""Every file reader fails cleanly. Random bytes, truncated copies and copies with bits flipped of
valid files (shards, config TOML, checkpoints, run directories, tokenizer inputs, HellaSwag JSONL),
and a few crafted ones, either load — and then the result is sane — or are refused with one line
through a SpeedrunError (UsageError exit 2, DataError exit 1); no other exception, no traceback.

Each test collects every case that broke the promise and fails with the whole list, one line per
case. The cases come from fixed seeds, so a failure reproduces exactly."""

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import prepared, speedrun_cmd
from speedrun import analysis, checkpoint, cli, export, loading
from speedrun.config import Config, from_dict, load_config, to_dict, to_toml
from speedrun.data import shards
from speedrun.data.loader import TrainLoader
from speedrun.data.tokenizer import EOT, VOCAB_SIZE
from speedrun.distributed import Runtime
from speedrun.errors import DataError, SpeedrunError, UsageError
from speedrun.evaluate import read_hellaswag
from speedrun.model import GPT
from speedrun.optim import build_optimizers

FIXTURES = Path(__file__).parent / "fixtures"
REFUSED = object()
# More cases per reader for a deeper search, e.g. SPEEDRUN_FUZZ_SCALE=20; the first cases stay the same.
SCALE = int(os.environ.get("SPEEDRUN_FUZZ_SCALE", "1"))
NESTED_JSON = "[" * 100_000 + "]" * 100_000  # deeper than the parser's recursion limit
HUGE = "1" + "0" * 5000  # more digits than int() converts (sys.get_int_max_str_digits() is 4300)


# ---------------------------------------------------------------------------------------------
# cases and outcomes


def mutants(valid: bytes, n: int, seed: int, edge: int = 2048) -> list[tuple[str, bytes]]:
    """n damaged copies of `valid`, in turn: random bytes, a truncated copy, and two with 1-3 bits
    flipped (half of the flips within `edge` bytes of either end, where formats keep their headers,
    pickles, JSON headers and footers; half of them in bit 0, which keeps a digit a digit and most
    letters letters, so that text files often stay valid with other values)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n * SCALE):
        kind = i % 4
        if kind == 0:
            size = int(rng.choice([0, 1, 8, 100, len(valid) // 2, len(valid)]))
            cases.append((f"random {size} bytes (seed {seed}, case {i})", rng.integers(0, 256, size, np.uint8).tobytes()))
        elif kind == 1:
            cut = int(rng.integers(0, len(valid)))
            cases.append((f"truncated to {cut} of {len(valid)} bytes", valid[:cut]))
        else:
            data = bytearray(valid)
            bits = []
            for _ in range(int(rng.integers(1, 4))):
                where = rng.random()
                if where < 0.5 or len(data) <= 2 * edge:
                    byte = int(rng.integers(0, len(data)))
                elif where < 0.75:
                    byte = int(rng.integers(0, edge))
                else:
                    byte = len(data) - 1 - int(rng.integers(0, edge))
                bit = 0 if rng.random() < 0.5 else int(rng.integers(1, 8))  # bit 0: digits stay digits
                data[byte] ^= 1 << bit
                bits.append(f"{byte}.{bit}")
            cases.append((f"bits flipped at byte.bit {', '.join(bits)} of {len(valid)} bytes", bytes(data)))
    return cases


class Outcomes:
    """Runs readers on cases, keeping every broken promise instead of stopping at the first."""

    def __init__(self):
        self.failures: list[str] = []
        self.loaded = self.refused = 0

    def call(self, case: str, fn, *args, name: str | None = None, expect=SpeedrunError, **kwargs):
        """fn's result, or REFUSED when it raised a SpeedrunError (of class `expect`) with a one-line
        message (naming `name` if given). Any other exception is recorded as a failure and also
        gives REFUSED."""
        try:
            result = fn(*args, **kwargs)
        except SpeedrunError as e:
            self.refused += 1
            message = str(e).strip()
            if not isinstance(e, expect):
                self.failures.append(f"{case}: {type(e).__name__}, expected {expect}: {message!r}")
            elif not message or "\n" in message:
                self.failures.append(f"{case}: {type(e).__name__} message is not one line: {message!r}")
            elif name is not None and name not in message:
                self.failures.append(f"{case}: {type(e).__name__} message does not name {name}: {message!r}")
            return REFUSED
        except Exception as e:  # noqa: BLE001 - the point of the test
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.failures.append(f"{case}: {getattr(fn, '__name__', fn)} raised {type(e).__module__}."
                                 f"{type(e).__name__}: {first}")
            return REFUSED
        self.loaded += 1
        return result

    def sane(self, case: str, check, *args) -> None:
        """`check(*args)` asserts what a successful load must hold."""
        try:
            check(*args)
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.failures.append(f"{case}: loaded but not sane: {type(e).__name__}: {first}")

    def done(self) -> None:
        assert not self.failures, f"{len(self.failures)} broken promises:\n" + "\n".join(self.failures)


def one_error_line(r: subprocess.CompletedProcess, codes=(1, 2)) -> str:
    assert r.returncode in codes and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """`speedrun ARGV` in this process: exit code and stderr."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# token shards


def _valid_shard(path: Path) -> bytes:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB_SIZE - 1, 400).astype(np.uint16)
    tokens[[0, 150, 310]] = EOT
    shards.write_shard(path, tokens)
    return path.read_bytes()


def _shard_sane(path: Path, tokens, vocab_size):
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    assert path.stat().st_size == shards.HEADER_BYTES + 2 * tokens.size
    if vocab_size is not None and tokens.size:
        assert int(tokens.max()) < vocab_size


def _count_sane(count):
    assert isinstance(count, int) and count >= 0, count


def test_shard_readers(tmp_path):
    valid = _valid_shard(tmp_path / "valid.bin")
    header = np.zeros(shards.HEADER_INTS, "<i4")
    crafted = []
    for magic, version, count, extra in [(shards.MAGIC, 1, -1, 0), (shards.MAGIC, 1, 2**31 - 1, 0),
                                         (shards.MAGIC, 2, 0, 0), (shards.MAGIC, 1, 3, 6), (shards.MAGIC, 1, 0, 2),
                                         (shards.MAGIC, 1, 0, 0), (-1, -1, -1, 0)]:
        header[:3] = magic, version, count
        crafted.append((f"header {magic}/{version}/{count} + {extra} bytes", header.tobytes() + b"\xff" * extra))
    crafted.append(("header only, 1 byte short", valid[:shards.HEADER_BYTES - 1]))
    crafted.append(("ids beyond the vocabulary", valid[:shards.HEADER_BYTES] + b"\xff\xff" * 400))
    out = Outcomes()
    for i, (case, data) in enumerate(mutants(valid, 40, seed=10) + crafted):
        path = tmp_path / f"case_{i:03d}.bin"
        path.write_bytes(data)
        count = out.call(case, shards.read_header, path, name=path.name)
        if count is not REFUSED:
            out.sane(case, _count_sane, count)
        for vocab in (None, VOCAB_SIZE):
            tokens = out.call(f"{case} (vocab {vocab})", shards.read_shard, path, vocab, name=path.name)
            if tokens is not REFUSED:
                out.sane(case, _shard_sane, path, tokens, vocab)
    out.call("a folder", shards.read_shard, tmp_path, name=tmp_path.name)
    out.call("a missing file", shards.read_shard, tmp_path / "missing.bin", name="missing.bin")
    out.done()


def _no_lines(lines):
    assert not lines, lines


def test_data_inspect_on_damaged_shards(tmp_path, capsys):
    valid = _valid_shard(tmp_path / "valid.bin")
    out = Outcomes()
    for i, (case, data) in enumerate(mutants(valid, 16, seed=11)):
        path = tmp_path / f"case_{i:03d}.bin"
        path.write_bytes(data)
        result = out.call(case, run_main, ["data", "inspect", str(path)], capsys)
        if result is REFUSED:
            continue
        code, err = result
        lines = err.strip().splitlines()
        if code == 0:
            out.sane(case, _no_lines, lines)
        elif code != 1 or len(lines) != 1 or path.name not in lines[0]:
            out.failures.append(f"{case}: exit {code}, stderr {err!r}")
    out.done()
    # and once through the real command line: one line on stderr, exit 1, no traceback
    (tmp_path / "short.bin").write_bytes(valid[:-3])
    line = one_error_line(subprocess.run(speedrun_cmd("data", "inspect", str(tmp_path / "short.bin")),
                                         capture_output=True, text=True, timeout=120), codes=(1,))
    assert line.startswith("speedrun data: error: ") and "short.bin: truncated" in line


# ---------------------------------------------------------------------------------------------
# config TOML and tables


def _config_sane(cfg):
    assert isinstance(cfg, Config)
    for section, table in to_dict(cfg).items():
        for key, value in (table.items() if isinstance(table, dict) else [(section, table)]):
            for v in value if isinstance(value, list) else [value]:
                assert not isinstance(v, float) or np.isfinite(v), f"{section}.{key} = {value}"


CRAFTED_TOML = [
    '[model]\nn_layer = "6"', "model = 5", "[model]\nnope = 1", "[model.sub]\nx = 1", "[model]\nwindow_block = 0",
    "[model]\nvocab_multiple = 0", "[model]\nskip_attn_layers = 7", "[model]\nfp8_scales = []",
    "[optim]\nadam_betas = []", "[optim]\nadam_betas = [[0.9], 0.95]", 'preset = "no-such-preset"',
    'preset = "../tiny"', 'preset = "a\\u0000b"', f'preset = "{"x" * 5000}"', "preset = 5",
    "[train]\nsteps = 1e400", "[train]\nsteps = 99999999999999999999999", "[optim]\nlr_hidden = nan",
    "[optim]\nlr_hidden = inf", "[model]\nrotary_base = inf", "[train]\ntarget_val_loss = -nan",
    "[data]\nseq_len = 0", "[data]\nbatch_tokens = -512", "description = 5", "[train]\ndevice = 'tpu'",
    "x = " + "[" * 3000 + "]" * 3000, "x = " + "{ a = " * 2000 + "1" + " }" * 2000,
    "[optim]\nlr_hidden = 1" + "0" * 400, "[model]\nn_layer = " + HUGE,
    "[model]\nn_head = 1" + "0" * 4000 + "\nhead_dim = 1" + "0" * 4000,
    "\ufeff[model]\nn_layer = 4", "[model]\nn_layer = 4\n[model]\nn_layer = 5", "[[model]]\nn_layer = 4",
]


def test_config_files(tmp_path):
    valid = to_toml(load_config("tiny-2025")).encode()
    out = Outcomes()
    cases = mutants(valid, 48, seed=20, edge=256) + [(f"crafted {t[:40]!r}", t.encode()) for t in CRAFTED_TOML]
    for i, (case, data) in enumerate(cases):
        path = tmp_path / f"case_{i:03d}.toml"
        path.write_bytes(data)
        cfg = out.call(case, load_config, None, path)
        if cfg is not REFUSED:
            out.sane(case, _config_sane, cfg)
    out.done()


def _random_value(rng, depth=0):
    kind = int(rng.integers(0, 8 if depth < 2 else 6))
    return [lambda: None, lambda: bool(rng.integers(0, 2)), lambda: int(rng.integers(-5, 3000)),
            lambda: float(rng.choice([0.0, -1.5, 0.5, 1e300, float("nan"), float("inf")])),
            lambda: str(rng.choice(["", "rms", "flex", "LSSSSL", "x" * 50])), lambda: 10**30,
            lambda: [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))],
            lambda: {str(rng.choice(["n_layer", "seq_len", "a"])): _random_value(rng, depth + 1)}][kind]()


def test_config_tables():
    """from_dict on tables such as a damaged export config.json holds: valid tables with one value
    replaced by a random one, random keys, and things that are not tables at all."""
    rng = np.random.default_rng(21)
    base = to_dict(load_config("tiny-2025"))
    cases: list[tuple[str, object]] = [("a list", [1, 2]), ("None", None), ("a string", "model"), ("an int", 3),
                                       ("sections that are lists", {"model": [1]}), ("a non-string key", {1: {}})]
    for i in range(40):
        table = json.loads(json.dumps(base))
        section = str(rng.choice(["model", "optim", "data", "train", "extra", "description"]))
        value = _random_value(rng)
        if section in table and isinstance(table[section], dict) and rng.random() < 0.8:
            key = str(rng.choice(sorted(table[section])))
            table[section][key] = value
            cases.append((f"{section}.{key} = {value!r:.60}", table))
        else:
            table[section] = value
            cases.append((f"{section} = {value!r:.60}", table))
    out = Outcomes()
    for case, table in cases:
        cfg = out.call(case, from_dict, table, "fuzz.json")
        if cfg is not REFUSED:
            out.sane(case, _config_sane, cfg)
    out.done()


# ---------------------------------------------------------------------------------------------
# checkpoints

CKPT_OVERRIDES = ["model.vocab_size=512", "model.n_layer=2", "model.n_head=1", "model.head_dim=64",
                  "model.model_dim=64", "model.value_embeds=1", "model.long_short_pattern=LS", "model.window_max=256",
                  "data.seq_len=128", "data.micro_batch_seqs=2", "data.batch_tokens=256", "data.val_tokens=1024",
                  "data.val_seq_len=512", "train.steps=2", "train.compile=false"]
CPU = Runtime(0, 1, 0, torch.device("cpu"))


def _trainer_parts(cfg, train_file: Path):
    """Model, optimizers and loader as the trainer builds them, for this small config."""
    model = prepared(GPT(cfg.model), sequences_per_loss=cfg.data.micro_batch_seqs)
    opts = build_optimizers(model.param_groups(), cfg.optim)
    loader = TrainLoader([train_file], seq_len=cfg.data.seq_len, micro_batch_seqs=cfg.data.micro_batch_seqs,
                         batch_tokens=cfg.data.batch_tokens, shard_boundary=cfg.data.shard_boundary, seed=cfg.train.seed)
    return model, opts, loader


def _train_step(model, opts, loader):
    for inputs, targets in loader.next_batch():
        model(inputs, targets, window_tokens=256).backward()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A checkpoint written by checkpoint.save exactly as the trainer writes one after a step, of a
    model small enough (512-token vocabulary, two layers) that each damaged copy loads in
    milliseconds; returns (checkpoint dir, config, train shard)."""
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    cfg = load_config("tiny-2025", None, CKPT_OVERRIDES)
    train_file = shards.write_shard(root / "data" / "fz_train_000000.bin",
                                    np.random.default_rng(30).integers(0, 512, 4000).astype(np.uint16))
    torch.manual_seed(0)
    model, opts, loader = _trainer_parts(cfg, train_file)
    _train_step(model, opts, loader)
    state = {"step": 1, "train_time_ms": 12.5, "loader": loader.state_dict(), "label": "fuzz"}
    ckpt = checkpoint.save(root / "run", model, opts, state, cfg, CPU, keep=1)
    loader.close()
    return ckpt, cfg, train_file


def _model_sane(loaded):
    config, model = loaded
    assert isinstance(config, Config) and isinstance(model, GPT) and not model.training


def _check_checkpoint(out: Outcomes, case: str, ckpt: Path, cfg, train_file: Path) -> None:
    """Every reader of a checkpoint, as resume, export, sample and eval use them: each refuses with
    a DataError naming the checkpoint, except that a folder without state.json is no checkpoint."""
    out.call(case, checkpoint.read_state, ckpt, name=ckpt.name, expect=DataError)
    saved = out.call(case, checkpoint.read_config, ckpt, name=ckpt.name, expect=DataError)
    if saved is not REFUSED:
        out.sane(case, _config_sane, saved)
    no_state = not (ckpt / "state.json").is_file()
    loaded = out.call(case, loading.load_model, ckpt, "cpu", name=ckpt.name,
                      expect=UsageError if no_state else DataError)
    if loaded is not REFUSED:
        out.sane(case, _model_sane, loaded)
    # resume: weights, optimizer and RNG states into the trainer's objects, then a training step
    rng = torch.get_rng_state()
    model, opts, loader = _trainer_parts(cfg, train_file)
    try:
        state = out.call(case, checkpoint.load, ckpt, model, opts, CPU, name=ckpt.name, expect=DataError)
        if state is not REFUSED:
            ok = out.call(f"{case} (loader state)", loader.load_state_dict, state.get("loader"))
            if ok is not REFUSED:
                out.sane(case, _state_sane, state)
                out.sane(case, _train_step, model, opts, loader)
    finally:
        loader.close()
        torch.set_rng_state(rng)


def _state_sane(state):
    assert isinstance(state["step"], int) and isinstance(state["train_time_ms"], (int, float)), state


def _copy(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest)
    return dest


@pytest.mark.parametrize("name,n", [("model.safetensors", 16), ("rank_00000.pt", 24), ("state.json", 24),
                                    ("config.toml", 24)])
def test_damaged_checkpoint_files(small_checkpoint, tmp_path, name, n):
    ckpt, cfg, train_file = small_checkpoint
    valid = (ckpt / name).read_bytes()
    out = Outcomes()
    seed = 40 + ["model.safetensors", "rank_00000.pt", "state.json", "config.toml"].index(name)
    for i, (case, data) in enumerate(mutants(valid, n, seed=seed, edge=1024)):
        case_dir = _copy(ckpt, tmp_path / f"step_{i:06d}")
        (case_dir / name).write_bytes(data)
        _check_checkpoint(out, f"{name} {case}", case_dir, cfg, train_file)
    missing = _copy(ckpt, tmp_path / "step_999999")
    (missing / name).unlink()
    _check_checkpoint(out, f"{name} missing", missing, cfg, train_file)
    out.done()


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_state(state: dict) -> list[tuple[str, str]]:
    loader = state["loader"]
    return [
        ("step a string", json.dumps({**state, "step": "1"})), ("step Infinity", json.dumps({**state, "step": float("inf")})),
        ("step negative", json.dumps({**state, "step": -4})), ("a list", "[1, 2]"), ("null", "null"),
        ("world size 0", json.dumps({**state, "world_size": 0})), ("world size 2.5", json.dumps({**state, "world_size": 2.5})),
        ("no clock or loader", json.dumps({"step": 1, "world_size": 1})),
        ("clock a string", json.dumps({**state, "train_time_ms": "soon"})),
        ("loader a list", json.dumps({**state, "loader": [1]})),
        ("loader without keys", json.dumps({**state, "loader": {"version": 1}})),
        ("loader with no files", json.dumps({**state, "loader": {**loader, "files": []}})),
        ("loader files a string", json.dumps({**state, "loader": {**loader, "files": "fz_train_000000.bin"}})),
        ("loader position a string", json.dumps({**state, "loader": {**loader, "sequence": "x"}})),
        ("loader position negative", json.dumps({**state, "loader": {**loader, "shard": -3}})),
        ("loader position beyond the shards", json.dumps({**state, "loader": {**loader, "shard": 7}})),
        ("deeply nested", NESTED_JSON), ("a 5001-digit step", json.dumps(state).replace('"step": 1', '"step": ' + HUGE)),
    ]


def _flip_in(data: bytes, word: bytes, bit: int = 0) -> bytes:
    """`data` with one bit flipped in the first occurrence of `word`."""
    at = data.index(word) + len(word) - 1
    return data[:at] + bytes([data[at] ^ 1 << bit]) + data[at + 1:]


def test_crafted_checkpoints(small_checkpoint, tmp_path):
    """Hand-made damage that random bytes rarely produce: states of the wrong types, rank files of
    the wrong structure or shapes, a pickle that would run code, configs that do not fit the weights."""
    ckpt, cfg, train_file = small_checkpoint
    state = json.loads((ckpt / "state.json").read_text())
    payload = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    rank = (ckpt / "rank_00000.pt").read_bytes()
    cases: list[tuple[str, str, bytes]] = [(f"state.json {c}", "state.json", t.encode())
                                                   for c, t in _crafted_state(state)]

    def saved(obj) -> bytes:
        path = tmp_path / "payload.pt"
        torch.save(obj, path)
        return path.read_bytes()

    adam = payload["optimizers"][0]
    some = next(iter(adam["state"]))
    wrong_shape = {**adam, "state": {**adam["state"], some: {**adam["state"][some],
                                                            "exp_avg": torch.zeros(3, 3)}}}
    cases += [
        ("rank file: a list", "rank_00000.pt", saved([1, 2])),
        ("rank file: no rng state", "rank_00000.pt", saved({"optimizers": payload["optimizers"]})),
        ("rank file: no optimizers", "rank_00000.pt", saved({"rng_cpu": payload["rng_cpu"]})),
        ("rank file: one optimizer short", "rank_00000.pt", saved({**payload, "optimizers": payload["optimizers"][:1]})),
        ("rank file: optimizers a dict", "rank_00000.pt", saved({**payload, "optimizers": {"a": 1}})),
        ("rank file: rng state too short", "rank_00000.pt", saved({**payload, "rng_cpu": torch.zeros(10, dtype=torch.uint8)})),
        ("rank file: rng state a float tensor", "rank_00000.pt", saved({**payload, "rng_cpu": torch.zeros(5056)})),
        ("rank file: a moment of the wrong shape", "rank_00000.pt",
         saved({**payload, "optimizers": [wrong_shape, *payload["optimizers"][1:]]})),
        ("rank file: a state key renamed by a flipped bit", "rank_00000.pt", _flip_in(rank, b"exp_avg_sq")),
        ("rank file: a tensor's storage key changed by a flipped bit", "rank_00000.pt", _flip_in(rank, b"cpu", 2)),
        ("config.toml: a layer more than the weights", "config.toml",
         to_toml(load_config("tiny-2025", None, [*CKPT_OVERRIDES, "model.n_layer=3", "model.long_short_pattern=LSL"])).encode()),
        ("config.toml: window_block = 0", "config.toml",
         (ckpt / "config.toml").read_text().replace("window_block = 128", "window_block = 0").encode()),
        ("config.toml: unknown key", "config.toml", b"[model]\nn_layers = 2\n"),
        ("model.safetensors: a header promising more than the file", "model.safetensors",
         (2**40).to_bytes(8, "little") + b"{}"),
    ]
    out = Outcomes()
    for i, (case, name, data) in enumerate(cases):
        case_dir = _copy(ckpt, tmp_path / f"step_{i:06d}")
        (case_dir / name).write_bytes(data)
        _check_checkpoint(out, case, case_dir, cfg, train_file)
    # a pickle that would run a command if unpickled without weights_only
    marker = tmp_path / "exploited"
    _Exploit.marker = marker
    case_dir = _copy(ckpt, tmp_path / "step_pickle")
    with open(case_dir / "rank_00000.pt", "wb") as f:
        pickle.dump({"optimizers": [], "rng_cpu": _Exploit()}, f)
    _check_checkpoint(out, "rank file: a plain pickle that runs a command", case_dir, cfg, train_file)
    zipped = _copy(ckpt, tmp_path / "step_zip_pickle")
    with open(zipped / "rank_00000.pt", "wb") as f:
        torch.save({"rng_cpu": _Exploit()}, f)
    _check_checkpoint(out, "rank file: a torch.save zip that runs a command", zipped, cfg, train_file)
    assert not marker.exists(), "loading a checkpoint executed pickled code"
    out.done()
    # the refusal names the file and is a DataError (exit 1): a damaged checkpoint is bad data
    model, opts, loader = _trainer_parts(cfg, train_file)
    loader.close()
    with pytest.raises(DataError, match="rank_00000.pt: not a loadable checkpoint file; refused to unpickle it"):
        checkpoint.load(zipped, model, opts, CPU)


CRAFTED_EXPORT_CONFIG = ["[1]", "null", '"model"', NESTED_JSON, '{"model": {"n_layer": ' + HUGE + "}}",
                         '{"model": {"window_block": 0}}', '{"model": {"rotary_base": Infinity}}', '{"optim": 5}']


@pytest.mark.parametrize("name,n", [("config.json", 24), ("model.safetensors", 12)])
def test_damaged_export_folders(small_checkpoint, tmp_path, name, n):
    ckpt, cfg, _ = small_checkpoint
    folder = export.export(ckpt, tmp_path / "valid")
    cases = mutants((folder / name).read_bytes(), n, seed=48 + (name == "config.json"), edge=1024)
    if name == "config.json":
        cases += [(f"crafted {c[:40]!r}", c.encode()) for c in CRAFTED_EXPORT_CONFIG]
    out = Outcomes()
    for i, (case, data) in enumerate(cases):
        copy = shutil.copytree(folder, tmp_path / f"export_{i:03d}")
        (copy / name).write_bytes(data)
        model = out.call(case, export.from_pretrained, copy, name=copy.name, expect=DataError)
        if model is not REFUSED:
            out.sane(case, _model_sane, (cfg, model))
        loaded = out.call(case, loading.load_model, copy, "cpu", name=copy.name, expect=DataError)
        if loaded is not REFUSED:
            out.sane(case, _model_sane, loaded)
    out.done()


# ---------------------------------------------------------------------------------------------
# run directories (speedrun plot / compare / record)


def _run_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(load_config("tiny-2025")))
    records = []
    for step in range(1, 5):
        records.append({"step": step, "tokens": 512 * step, "train_time_ms": 1000.5 * step, "train_loss": 10.8 - step / 10,
                        "lr": 1.0, "tokens_per_s": 96.6})
        if step % 2 == 0:
            records.append({"step": step, "tokens": 512 * step, "train_time_ms": 1000.5 * step, "val_loss": 10.5 - step / 10})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"config": "tiny-2025", "status": "finished", "final_val_loss": 10.1, "train_time_ms": 4002.0, "steps": 4,
               "tokens": 2048, "world_size": 1, "peak_memory_mib": 1006.4, "warmup_s": 0.0,
               "path": {"attention": "sdpa", "head": "float32"}, "val_set": {"sha256": "60e00f6c", "tokens": 1024}}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder


def _run_sane(run: analysis.Run) -> None:
    """What plot, compare and record read of a loaded run without further checks."""
    assert isinstance(run.status, str) and isinstance(run.label, str) and isinstance(run.target, float)
    run.stopped  # noqa: B018
    for r in run.val:
        assert isinstance(r["val_loss"], (int, float)) and not isinstance(r["val_loss"], bool), r
    for r in run.train:
        assert isinstance(r["train_loss"], (int, float)) and not isinstance(r["train_loss"], bool), r


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_damaged_run_directories(tmp_path, name):
    valid = (_run_dir(tmp_path / "valid") / name).read_bytes()
    out = Outcomes()
    for i, (case, data) in enumerate(mutants(valid, 40, seed=50 + (name == "summary.json"), edge=128)):
        run_dir = shutil.copytree(tmp_path / "valid", tmp_path / f"run_{i:03d}")
        (run_dir / name).write_bytes(data)
        for need_summary in (True, False):
            run = out.call(f"{name} {case}", analysis.load_run, run_dir, need_summary, name=name)
            if run is not REFUSED:
                out.sane(f"{name} {case}", _run_sane, run)
        if name == "metrics.jsonl":  # what a resume from a checkpoint at step 2 keeps of it
            done = out.call(f"{name} {case} (resume)", checkpoint.truncate_metrics, run_dir / name, 2, name=name,
                            expect=DataError)
            if done is not REFUSED:
                out.sane(f"{name} {case} (resume)", _truncated_sane, run_dir / name, 2)
    out.done()


def _truncated_sane(path: Path, step: int) -> None:
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["step"] < step or record["step"] == step and "val_loss" not in record, record


def test_resume_keeps_the_metrics_before_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = _run_dir(tmp_path / "run") / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n" + lines[-1][:17])  # killed while writing a line
    checkpoint.truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines[:2]
    path.write_text("\n".join([lines[0], '{"step": 2, "tok', lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        checkpoint.truncate_metrics(path, 2)


def _crafted_run(tmp_path: Path, name: str, text: str) -> Path:
    run_dir = _run_dir(tmp_path / "run")
    (run_dir / name).write_text(text)
    return run_dir


VAL_LINE = json.dumps({"step": 1, "tokens": 1, "train_time_ms": 1.0, "val_loss": 5.0})


@pytest.mark.parametrize("name,text", [
    ("metrics.jsonl", f"{VAL_LINE}\n{NESTED_JSON}\n"),
    ("summary.json", NESTED_JSON),
    ("config.toml", "x = " + "[" * 3000 + "]" * 3000),
    ("metrics.jsonl", f"{VAL_LINE}\n" + VAL_LINE.replace("5.0", HUGE) + "\n"),
    ("summary.json", '{"final_val_loss": ' + HUGE + "}"),
    ("config.toml", f"x = {HUGE}"),
])
def test_run_directory_files_that_json_or_toml_cannot_parse(tmp_path, name, text):
    with pytest.raises(SpeedrunError):
        analysis.load_run(_crafted_run(tmp_path, name, text))


def test_run_directory_with_a_val_loss_that_is_not_a_number(tmp_path):
    lines = [{"step": 1, "tokens": 1, "train_time_ms": 1.0, "val_loss": "low"}]
    run_dir = _crafted_run(tmp_path, "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    try:
        run = analysis.load_run(run_dir)
    except SpeedrunError:
        return
    _run_sane(run)


def test_run_directory_whose_config_train_is_not_a_table(tmp_path):
    try:
        run = analysis.load_run(_crafted_run(tmp_path, "config.toml", "train = 5\n"))
    except SpeedrunError:
        return
    _run_sane(run)


# ---------------------------------------------------------------------------------------------
# tokenizer inputs (speedrun data tokenize)

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n") * 3 + "Caf\u00e9 \u6f22\u5b57 \U0001f600 done.\n"


def _tokenize_outcome(out: Outcomes, case: str, path: Path, capsys) -> None:
    dest = path.parent / f"{path.name}-shards"
    result = out.call(case, run_main, ["data", "tokenize", str(path), "--out", str(dest), "--val-tokens", "0",
                                       "--workers", "1"], capsys)
    if result is REFUSED:
        return
    code, err = result
    lines = err.strip().splitlines()
    if code == 0:
        def written():
            files = sorted(dest.glob("data_train_*.bin"))
            assert files
            for f in files:
                tokens = shards.read_shard(f, VOCAB_SIZE)
                assert tokens.size and tokens[0] == EOT
        out.sane(case, written)
    elif code not in (1, 2) or len(lines) != 1 or not lines[0].startswith("speedrun data: error: "):
        out.failures.append(f"{case}: exit {code}, stderr {err!r}")


def _parquet(path: Path, column, name="text") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({name: column}), path)
    return path.read_bytes()


def test_tokenize_damaged_inputs(tmp_path, capsys):
    rng = np.random.default_rng(60)
    jsonl = "".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(TEXT.split("\n\n"))).encode()
    parquet = _parquet(tmp_path / "valid.parquet", TEXT.split("\n\n") * 20)
    cases: list[tuple[str, str, bytes]] = []
    for suffix, valid, n in ((".txt", TEXT.encode(), 8), (".jsonl", jsonl, 16), (".parquet", parquet, 20)):
        cases += [(f"{suffix} {case}", suffix, data) for case, data in mutants(valid, n, seed=61 + len(cases), edge=512)]
    for i in range(3):  # random bytes that happen to be text are a document like any other
        cases.append((f".txt random printable ASCII {i}", ".txt", rng.integers(32, 127, 300, np.uint8).tobytes()))
        chars = "".join(chr(int(c)) for c in rng.integers(1, 0xD7FF, 200))
        cases.append((f".txt random UTF-8 {i}", ".txt", chars.encode()))
    cases += [
        (".jsonl deeply nested", ".jsonl", NESTED_JSON.encode() + b"\n"),
        (".jsonl a 5001-digit number", ".jsonl", b'{"text": "a", "n": ' + HUGE.encode() + b"}\n"),
        (".jsonl text with a lone surrogate", ".jsonl", b'{"text": "a\\ud800b"}\n'),
        (".jsonl text a number", ".jsonl", b'{"text": 5}\n'),
        (".jsonl a list", ".jsonl", b"[1, 2]\n"),
        (".jsonl NaN text", ".jsonl", b'{"text": NaN}\n'),
        (".jsonl nothing but blank lines", ".jsonl", b"\n \n\n"),
        (".txt empty", ".txt", b""),
        (".txt a NUL byte", ".txt", b"a\x00b " * 10),
        (".parquet no text column", ".parquet", _parquet(tmp_path / "c1.parquet", ["a", "b"], name="body")),
        (".parquet text of integers", ".parquet", _parquet(tmp_path / "c2.parquet", [1, 2])),
        (".parquet all null", ".parquet", _parquet(tmp_path / "c3.parquet", [None, None], )),
    ]
    out = Outcomes()
    for i, (case, suffix, data) in enumerate(cases):
        folder = tmp_path / f"case_{i:03d}"
        folder.mkdir()
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        _tokenize_outcome(out, case, path, capsys)
    out.done()


def test_tokenize_damaged_input_through_the_command_line(tmp_path):
    """With a pool of workers and the real entry point: one line, exit 1, nothing left behind."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": p}) + "\n" for p in TEXT.split("\n\n")))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes()[:-20])
    r = subprocess.run(speedrun_cmd("data", "tokenize", str(good), str(bad), "--out", str(tmp_path / "out"),
                                    "--val-tokens", "0", "--workers", "2"), capture_output=True, text=True, timeout=120)
    line = one_error_line(r, codes=(1,))
    assert line.startswith("speedrun data: error: ") and "bad.jsonl:" in line
    assert not list((tmp_path / "out").glob("*.bin"))


# ---------------------------------------------------------------------------------------------
# HellaSwag JSONL (speedrun eval hellaswag --data FILE)


def _items_sane(items):
    assert items
    for ctx, endings, label in items:
        assert isinstance(ctx, str) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
        assert isinstance(label, int) and 0 <= label < 4


def test_hellaswag_reader(tmp_path):
    valid = (FIXTURES / "hellaswag_tiny.jsonl").read_bytes()
    first = json.loads(valid.splitlines()[0])
    crafted = [json.dumps({**first, "label": v}) for v in ("2", 2.5, True, "9" * 5000, None, -1, 4)]
    crafted += ['{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": Infinity}',
                '{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1e400}',
                '{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": NaN}',
                json.dumps({**first, "endings": first["endings"][:3]}), json.dumps({**first, "ctx": None}),
                json.dumps({**first, "endings": "abcd"}), "[1, 2, 3]", '"ctx"', NESTED_JSON,
                '{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": ' + HUGE + "}"]
    cases = mutants(valid, 40, seed=70, edge=256) + [(f"crafted line {c[:50]!r}", c.encode() + b"\n") for c in crafted]
    out = Outcomes()
    for i, (case, data) in enumerate(cases):
        path = tmp_path / f"case_{i:03d}.jsonl"
        path.write_bytes(data)
        items = out.call(case, read_hellaswag, path, name=path.name)
        if items is not REFUSED:
            out.sane(case, _items_sane, items)
    out.call("a folder", read_hellaswag, tmp_path, name=tmp_path.name)
    out.done()


def test_eval_hellaswag_names_a_damaged_file(small_checkpoint, tmp_path, capsys):
    ckpt = small_checkpoint[0]
    valid = (FIXTURES / "hellaswag_tiny.jsonl").read_bytes()
    for i, data in enumerate([valid[:len(valid) // 2], b"\xff\xfe" + valid, valid.replace(b'"label": 2', b'"label": 1e999')]):
        path = tmp_path / f"damaged_{i}.jsonl"
        path.write_bytes(data)
        code, err = run_main(["eval", "hellaswag", str(ckpt), "--data", str(path), "--device", "cpu"], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"speedrun eval: error: {path}:"), err
