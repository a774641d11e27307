"""The 2026 record's gates, all from one place: which gates a config has, their start values, and
where their values come from.

A gate is a small per-layer multiplier: the x0 re-injection (E5) and bigram injection (E2) after an
attention sublayer, XSA's strength (A6), the attention output gate (A7), a skip connection's gate
(R1) and the composable attention's head weights (A8). With `gate_generators` off each gate is a
learned constant starting at its value; with it on (R4) every gate is computed per token by one of
two generators, 0.1·(W2·GELU(W1·x) + b) with W2 zero at init and b at start/0.1, so a fresh model
has exactly the constants' values. The first generator reads x0 and serves the layers before
`gate_split_layer`; the second reads the residual stream entering that layer and serves the rest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig

GENERATOR_WIDTH = 64  # hidden units of a gate generator
GENERATOR_SCALE = 0.1  # the learned output scale's start; biases are stored divided by it


class Gate(NamedTuple):
    name: str  # x0 | bigram | xsa | attn_out | skip | dc_w1 | dc_w2
    layer: int  # the layer that uses it (a skip gate: the layer it enters)
    width: int  # 1, or one value per head
    start: float


def attention_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layer) if i not in cfg.skip_attn_layers]


def gate_layout(cfg: ModelConfig) -> list[Gate]:
    """Every gate of the config, in a fixed order. The last layer's x0 and bigram gates belong to
    MUDD (speedrun.mudd) when it is on; the bigram gate of layer 0 weighs the injection before it."""
    h, gates = cfg.n_head, []
    mudd_layer = cfg.n_layer - 1 if cfg.mudd else None
    for i in attention_layers(cfg):
        if i in cfg.xsa_layers:
            gates.append(Gate("xsa", i, h, 0.0))
        if i in cfg.attn_gate_layers:
            gates.append(Gate("attn_out", i, h, 0.25))
        if i != mudd_layer:
            if cfg.x0_gates:
                gates.append(Gate("x0", i, 1, 0.0))
            if cfg.bigram_vocab:
                gates.append(Gate("bigram", i, 1, cfg.bigram_gate))
        if i in cfg.composable_layers:
            gates += [Gate("dc_w1", i, h, 1.0), Gate("dc_w2", i, h, 0.0)]
    gates += [Gate("skip", to, 1, 0.5) for _, to in cfg.skip_connections]
    return sorted(gates, key=lambda g: g.layer)


class Generator(nn.Module):
    """Per-token outputs scale·(W2·GELU(W1·x) + b): W1 as nn.Linear's default init, W2 zero, b the
    start values divided by GENERATOR_SCALE (the scale the caller passes starts there)."""

    def __init__(self, dim: int, starts: list[float], role: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(GENERATOR_WIDTH, dim))
        self.w2 = nn.Parameter(torch.empty(len(starts), GENERATOR_WIDTH))
        self.b = nn.Parameter(torch.empty(len(starts)))
        self.starts = starts
        self.w1.role = self.w2.role = role
        self.b.role = f"{role}_bias"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.w1.size(1))
        self.w1.uniform_(-bound, bound)
        self.w2.zero_()
        self.b.copy_(torch.tensor(self.starts)).div_(GENERATOR_SCALE)  # in place: a meta-device division imports torch._dynamo

    def forward(self, x: Tensor, scale: float | Tensor) -> Tensor:
        hidden = F.gelu(F.linear(x, self.w1.type_as(x)))
        return (F.linear(hidden, self.w2.type_as(x)) + self.b.type_as(x)) * scale


class Gates(nn.Module):
    """`first(x0)` and `second(x)` each return {(name, layer): value} for their gates, the values
    (B, T, width) from a generator or (width,) constants; GPT.forward calls `second` on the stream
    entering `split` (with constants it may call it anywhere)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layout = gate_layout(cfg)
        self.split = cfg.gate_split_layer if cfg.gate_generators else cfg.n_layer
        self.generated = cfg.gate_generators
        if self.generated:
            self.gen = nn.ModuleList(Generator(cfg.model_dim, [g.start for g in part for _ in range(g.width)], "gate_gen")
                                     for part in self._parts())
            self.scale = nn.Parameter(torch.empty(()))  # one learned output scale for both, as the record
            self.scale.role = "gate_gen_bias"
        else:
            self.values = nn.Parameter(torch.empty(sum(g.width for g in self.layout)))

    def _parts(self) -> tuple[list[Gate], list[Gate]]:
        return ([g for g in self.layout if g.layer < self.split], [g for g in self.layout if g.layer >= self.split])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.generated:
            for gen in self.gen:
                gen.reset_parameters()
            self.scale.fill_(GENERATOR_SCALE)
        else:
            self.values.copy_(torch.tensor([g.start for g in self.layout for _ in range(g.width)]))

    def _unpack(self, gates: list[Gate], flat: Tensor) -> dict[tuple[str, int], Tensor]:
        out, at = {}, 0
        for g in gates:
            out[(g.name, g.layer)] = flat[..., at:at + g.width]
            at += g.width
        return out

    def first(self, x0: Tensor) -> dict[tuple[str, int], Tensor]:
        if not self.generated:
            return self._unpack(self.layout, self.values.type_as(x0))
        return self._unpack(self._parts()[0], self.gen[0](x0, self.scale.type_as(x0))) if self._parts()[0] else {}

    def second(self, x: Tensor) -> dict[tuple[str, int], Tensor]:
        if not self.generated or not self._parts()[1]:
            return {}
        return self._unpack(self._parts()[1], self.gen[1](x, self.scale.type_as(x)))
