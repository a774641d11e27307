"""MUDD connections (R3, after "Multiway Dynamic Dense" connections): per-token coefficients, from
a small generator on the residual stream, that mix earlier activations into the last block and
into the final residual.

The saved activations are c0 (the stream entering block 0), c_s (the output of
model.attn_input_layer, the activation the late blocks attend from) and x (the stream entering the
last block). Entering the last block, one generator gives 14 coefficients:
  v_mix (3):  c0, c_s, x mixed into the last attention's values;
  mix (3):    x <- (1 + m_x)·x + m_0·c0 + m_s·c_s;
  ve (2):     the value-embedding gate for the first and second half of the heads (from 2.0);
  lambdas (6): the block's residual r/p for attention, the x0 and bigram gates, r/p for the MLP.
After the loop a second generator gives the coefficients of c0, c_s, x (the last block's input),
the first value-embedding table's lookup and each skip source, added to the final residual; c_s's
starts at -0.5 (the older "backout" of the saved activation), the rest at 0. With W2 zero at init,
every coefficient starts at its value, so a fresh last block is the plain block with its constants.
"""

from __future__ import annotations

from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.gates import GENERATOR_SCALE, Generator

LAST_BLOCK = ("v_c0", "v_cs", "v_x", "mix_c0", "mix_cs", "mix_x", "ve_a", "ve_b",
              "resid_attn", "branch_attn", "x0", "bigram", "resid_mlp", "branch_mlp")


def final_sources(cfg: ModelConfig) -> list[str]:
    """Names of what the final mix adds: c0, cs, last_in (the last block's input), ve (the first value-embedding layer's lookup,
    when there is one) and one "skip<from>" per skip connection's source."""
    return ["c0", "cs", "last_in"] + (["ve"] if cfg.value_embed_layers else []) + [f"skip{a}" for a, _ in cfg.skip_connections]


class MUDD(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        starts = {"ve_a": 2.0, "ve_b": 2.0, "resid_attn": 1.1 ** 0.5, "branch_attn": 1.0, "bigram": cfg.bigram_gate,
                  "resid_mlp": 1.1 ** 0.5, "branch_mlp": 1.0}
        self.last = Generator(cfg.model_dim, [starts.get(name, 0.0) for name in LAST_BLOCK], "mudd")
        self.sources = final_sources(cfg)
        self.final = Generator(cfg.model_dim, [-0.5 if name == "cs" else 0.0 for name in self.sources], "mudd")

    def reset_parameters(self) -> None:
        self.last.reset_parameters()
        self.final.reset_parameters()

    def last_block(self, x: Tensor) -> dict[str, Tensor]:
        """The 14 coefficients for the last block, each (B, T, 1)."""
        return dict(zip(LAST_BLOCK, self.last(x, GENERATOR_SCALE).split(1, dim=-1)))

    def final_mix(self, x: Tensor, saved: dict[str, Tensor]) -> Tensor:
        """x plus the final mix of `saved` (one tensor per name in final_sources)."""
        coefs = self.final(x, GENERATOR_SCALE).split(1, dim=-1)
        for name, coef in zip(self.sources, coefs):
            x = x + coef * saved[name]
        return x
