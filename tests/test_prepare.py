"""speedrun.prepare's process settings: glibc told to serve large tensors from the heap and keep
what is freed, unless the user chose otherwise (the values computed are the same; the speed is a
benchmark: docs/benchmarks.md), and inductor's compile cache under $SPEEDRUN_CACHE."""

import os
import subprocess
import sys

import pytest

from speedrun import prepare

PROBE = """
import ctypes, torch
from speedrun.prepare import keep_freed_host_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
took = keep_freed_host_memory()
torch.manual_seed(0)
mapped = mallinfo2().hblks  # chunks mapped on their own so far (by the imports, say)
big = torch.randn(64, 2**20)  # 256 MB: glibc maps an allocation this large on its own, unless told not to
print(took, mallinfo2().hblks - mapped, f"{float(big[0, :8].sum()):.6f}")
"""


def probe(env: dict) -> list[str]:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None}).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_tensors_come_from_the_heap_unless_the_user_chose_otherwise():
    kept = probe({"MALLOC_MMAP_MAX_": None, "MALLOC_TRIM_THRESHOLD_": None})
    own = probe({"MALLOC_MMAP_MAX_": "65536"})  # the user's setting: left alone
    assert kept[0] == "True" and own[0] == "False"
    assert kept[2] == own[2]  # the same numbers either way
    # kept: the tensor lives on the heap, no chunk of its own mapped; the user's default: one mapped chunk
    assert int(kept[1]) == 0 and int(own[1]) == 1


def test_prepare_applies_it_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(prepare, "keep_freed_host_memory", lambda: calls.append(1) or True)
    from conftest import prepared
    from speedrun.config import load_config
    from speedrun.model import GPT

    cfg = load_config("tiny-2025", None, ["model.n_layer=2", "model.long_short_pattern=LL", "model.value_embeds=1"]).model
    prepared(GPT(cfg), "cpu", "inference")
    assert calls == [1]


CACHE_PROBE = """
import sys
from speedrun.cli import main
main(["presets"])
import torch._dynamo  # fixes inductor's cache dir on import
from torch._inductor.runtime.cache_dir_utils import cache_dir
print(cache_dir())
"""


@pytest.mark.parametrize("user_dir", [None, "mine"])
def test_the_cli_keeps_compiled_kernels_under_speedrun_cache(tmp_path, user_dir):
    """Importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to /tmp's default if it is unset, so the
    CLI must set it first: compiled kernels then land in $SPEEDRUN_CACHE/inductor and a second run
    reuses them. A directory the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["SPEEDRUN_CACHE"] = str(tmp_path / "cache")
    if user_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / user_dir)
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == str(tmp_path / (user_dir or "cache/inductor"))


@pytest.mark.parametrize("user_setting", [None, "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_the_allocator_grows_segments_unless_the_user_chose(monkeypatch, user_setting):
    """The record's expandable segments, under the variable's name since torch 2.9 (the old one
    makes torch 2.9 print a warning in every process); a setting of the user's, under either name,
    stays the only one."""
    from speedrun.distributed import use_expandable_segments

    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    if user_setting is not None:
        monkeypatch.setenv(user_setting, "garbage_collection_threshold:0.8")
    use_expandable_segments()
    expected = {user_setting: "garbage_collection_threshold:0.8"} if user_setting else \
        {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert {name: os.environ[name] for name in names if name in os.environ} == expected


@pytest.mark.parametrize("user_setting", [None, "1"])
def test_mix_order_reduction_is_off_unless_the_user_chose(monkeypatch, user_setting):
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "mix_order_reduction"):
        pytest.skip("this torch's inductor has no mix-order reduction (new in 2.10)")
    if user_setting is None:
        monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", user_setting)
    with inductor_config.patch({"triton.mix_order_reduction": True}):
        prepare.avoid_inductor_mix_order_reduction()
        assert inductor_config.triton.mix_order_reduction is (user_setting is not None)


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_cpu_compiles_trust_the_vector_isa_unless_the_user_chose(monkeypatch, user_setting):
    """A compiled CPU run lets inductor take its vector ISA from the CPU's flags rather than build
    ATen's vector headers once per candidate (prepare.trust_cpu_vector_isa); a TORCHINDUCTOR_VEC_ISA_OK
    the user set stays in charge."""
    import torch
    import torch._inductor.config as inductor_config

    from speedrun.config import load_config
    from speedrun.model import GPT

    if user_setting is None:
        monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", user_setting)
    cfg = load_config("tiny")
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        prepare.prepare(GPT(cfg.model), cfg, torch.device("cpu"), "train")
        assert inductor_config.cpp.vec_isa_ok is (True if user_setting is None else None)


@pytest.mark.parametrize("compile,mode,expected", [("auto", "train", True), (False, "train", False),
                                                   ("auto", "eval", False), (True, "train", False)])
def test_cpu_training_under_auto_compiles_the_regions(compile, mode, expected):
    """train.compile = auto on CPU compiles the regions (prepare.compile_scope): the loss tail by row
    chunks, and each Attention's q/k norm and rotation and each MLP's relu² backward; --no-compile,
    evaluation and a whole-model compile (which traces the plain code) leave them eager."""
    import torch

    from speedrun.config import load_config
    from speedrun.mlp import MLP
    from speedrun.model import GPT, Attention

    cfg = load_config("tiny", None, [f"train.compile={str(compile).lower()}"])
    model = GPT(cfg.model)
    prepare.prepare(model, cfg, torch.device("cpu"), mode)
    regions = [m.compiled for m in model.modules() if isinstance(m, (Attention, MLP))]
    assert len(regions) == 2 * cfg.model.n_layer and set(regions) == {expected}
    assert (model.lm_head.chunk_rows > 0) == expected
