"""The GPT: one plain nn.Module whose every ModelConfig field is a switch.

With the gpt2-speedrun-2025 preset it is modded-nanogpt's record model of 2025-01-26 (QK-norm, half
rotary, value embeddings, U-net skips, x0 mixing, ReLU^2, softcapped FP8 head, document-causal
sliding-window FlexAttention); with gpt2-speedrun, the record of 2026-07-17 (11 blocks, smear gate,
bigram hash, gated per-layer value embeddings, residual scalars, a skip and a saved activation,
MUDD connections and gate generators, paired heads, XSA, composable attention, key offset, YaRN;
docs/model-2026.md); with gpt2-baseline it is nanoGPT's GPT-2 (learned positions, LayerNorm, GELU,
biases, tied head, causal SDPA). The 2026 pieces reach each block through LayerExtras, built per
block by GPT._enter_block; a model without them passes None and computes what it always did.

Weights are stored in fp32 and cast to the activations' dtype where they are used. There is no
autocast: `speedrun.prepare` picks the activation dtype (ModelConfig.activation_dtype; bf16
on CUDA, as the record), the embedding lookups start the residual stream in it, and every matmul
and attention then runs in it; only rotary's rotation and the logits are computed in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.attention import (NO_WINDOW, SHRINK, attend, build_masks, composable_attention, document_ids, farthest_key,
                                key_offset, window_rule_block, xsa)
from speedrun.config import ROLES, ModelConfig
from speedrun.embed import BigramEmbedding, LayerValueEmbeddings, SmearGate, Table, build_input_embeddings, embed, normal_
from speedrun.gates import Gates, attention_layers, gate_layout
from speedrun.loss import LMHead
from speedrun.mlp import MLP
from speedrun.mudd import MUDD
from speedrun.rotary import (apply_rotary, base_frequencies, from_pair_rows, paired_tables, rotary_tables_from,
                             rotate_paired, to_pair_rows, yarn_state)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def position_qk(qk: Tensor, tables: tuple[Tensor, Tensor] | None, qk_norm: bool, paired: bool, pairs: str) -> Tensor:
    """q and k side by side, (B, T, 2H, D), QK-normed (qk_norm) and rotated (tables: a paired-head
    layer's or the plain ones); one call for both, which a compiled run makes one kernel."""
    if qk_norm:
        qk = rms_norm(qk)
    if tables is None:
        return qk
    return rotate_paired(qk, tables, pairs) if paired else apply_rotary(qk, *tables, pairs)


@functools.cache
def _compiled_position_qk():
    # Eager, the norm and rotation are about 25 small passes over q and k, forward and backward: 3.4
    # against 1.3 ms a layer compiled on 2 cores, for about 3 s of cold compile (docs/benchmarks.md)
    return torch.compile(position_qk, dynamic=False)


class RMSNorm(nn.Module):
    """Parameter-free RMS norm."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm() if cfg.norm == "rms" else nn.LayerNorm(cfg.model_dim, bias=cfg.bias)


class Linear(nn.Module):
    """nn.Linear without its init (GPT.init_weights owns that), casting the fp32 weights to the
    input's dtype so bf16 activations work with or without autocast."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.type_as(x)
        return F.linear(x, self.weight.type_as(x), bias)


VE_GATE_DIMS = 6  # E3: the value-embedding gate reads this many dims of the attention input and of the table


def mudd_owned(cfg: ModelConfig, layer: int) -> bool:
    """Whether MUDD (R3) supplies `layer`'s residual scalars and value-embedding gate: its last block."""
    return cfg.mudd and layer == cfg.n_layer - 1


@dataclass
class LayerExtras:
    """What a 2026-record layer takes besides its input (GPT.forward builds one per layer; None for
    a model without those techniques): its gates ({name: value}, speedrun.gates), the bigram term
    (added after attention with the layer's gate unless it was injected before the loop), the
    activation to attend from (R2), the x0 term of the re-injection, MUDD's coefficients on the last
    block, extra values (MUDD), document ids (composable attention) and YaRN's query scale."""
    gates: dict[str, Tensor] = field(default_factory=dict)
    bigram: Tensor | None = None
    attn_input: Tensor | None = None
    x0: Tensor | None = None
    mudd: dict[str, Tensor] | None = None
    v_extra: Tensor | None = None
    docs: Tensor | None = None
    q_scale: Tensor | None = None


class StreamState(NamedTuple):
    """GPT.forward's per-pass state for the 2026 pieces (see _stream_state); `saved` maps "c0" and
    "c<i+1>" (the output of block i) and, with MUDD, "last_in" to activations."""
    gates: dict[tuple[str, int], Tensor]
    bigram: Tensor | None
    saved: dict[str, Tensor]
    docs: Tensor | None
    q_scale: Tensor | None
    x0: Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, has_value_embed: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_head * cfg.head_dim
        # q, k and v stacked on a leading axis, so Muon orthogonalises each on its own
        self.qkv = nn.Parameter(torch.empty(3, inner, cfg.model_dim))
        # NorMuon's tag (a plain attribute, so not in the state_dict): how q and k split into heads
        self.qkv.matrix_layout = ("qkv", cfg.head_dim)
        self.qkv_bias = nn.Parameter(torch.empty(3 * inner)) if cfg.bias else None
        # 2025: v = a*v (+ b*value_embedding); only layers with a value table get b, so no parameter is unused
        self.v_mix = nn.Parameter(torch.empty(2 if has_value_embed else 1)) if cfg.value_embeds else None
        # 2026 (E3): v += 2σ(W·[a[:6]; ve[:6]])·ve per head, W from zero
        gated = layer in cfg.value_embed_layers and not mudd_owned(cfg, layer)  # MUDD gates its last block's
        self.ve_gate = nn.Parameter(torch.empty(cfg.n_head, 2 * VE_GATE_DIMS)) if gated else None
        if self.ve_gate is not None:
            self.ve_gate.role = "gate"
        self.lambdas = nn.Parameter(torch.empty(2)) if cfg.attn_lambdas else None  # A5: on W_qkv and W_o
        self.proj = Linear(inner, cfg.model_dim, cfg.bias)
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self.pairs = cfg.rotary_pairs
        self.paired = layer in cfg.paired_head_layers
        self.key_offset = cfg.key_offset and cfg.window_letter(layer) == "L"
        self.xsa = layer in cfg.xsa_layers
        self.out_gate = layer in cfg.attn_gate_layers
        self.composable = layer in cfg.composable_layers
        # set by speedrun.prepare where a run compiles by regions (CPU): q and k's norm and rotation compiled
        self.compiled = False

    def _values(self, v: Tensor, x: Tensor, ve: Tensor | None, extras: LayerExtras | None) -> Tensor:
        if self.v_mix is not None:
            v = self.v_mix[0] * v + self.v_mix[1] * ve.view_as(v) if ve is not None else self.v_mix[0] * v
        elif ve is not None:
            ve = ve.view_as(v)
            if extras is not None and extras.mudd is not None:  # the last block's gate is MUDD's, per half of the heads
                gate = torch.cat([extras.mudd["ve_a"], extras.mudd["ve_b"]], dim=-1).repeat_interleave(v.size(2) // 2, dim=-1)
            else:
                gate = 2 * torch.sigmoid(F.linear(torch.cat([x[..., :VE_GATE_DIMS], ve.flatten(2)[..., :VE_GATE_DIMS]], -1),
                                                  self.ve_gate.type_as(x)))
            v = v + gate.unsqueeze(-1) * ve
        if extras is not None and extras.v_extra is not None:
            v = v + extras.v_extra.view_as(v)
        return v

    def forward(self, x: Tensor, ve: Tensor | None, mask, rotary, cache=None, extras: LayerExtras | None = None) -> Tensor:
        B, T, _ = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        bias = None if self.qkv_bias is None else self.qkv_bias.type_as(x)
        w = self.qkv.flatten(0, 1).type_as(x)
        qkv = F.linear(x, w if self.lambdas is None else self.lambdas[0].type_as(x) * w, bias).view(B, T, 3 * H, D)
        tables = None if rotary is None else rotary["paired" if self.paired else "plain"]
        # compiled for training only: under no_grad (validation) it would be a graph of its own, about
        # 2.2 s of cold compile to save 13 ms a validation of tiny (docs/benchmarks.md)
        position = _compiled_position_qk() if self.compiled and torch.is_grad_enabled() else position_qk
        q, k = position(qkv[:, :, :2 * H], tables, self.cfg.qk_norm, self.paired, self.pairs).chunk(2, dim=-2)
        v = qkv[:, :, 2 * H:]
        if self.key_offset:
            k = key_offset(k)
        v = self._values(v, x, ve, extras)
        if extras is not None and extras.q_scale is not None:
            q = q * extras.q_scale.type_as(q)
        rows = (to_pair_rows(q), to_pair_rows(k), to_pair_rows(v)) if self.paired else (q, k, v)
        qt, kt, vt = (t.transpose(1, 2) for t in rows)
        if cache is not None:
            kt, vt = cache.extend(kt, vt)
        y = attend(qt, kt, vt, mask, self.scale).transpose(1, 2)
        if self.paired:
            y = from_pair_rows(y)
        if self.composable:
            w1, w2 = (extras.gates[name].expand(B, T, H) for name in ("dc_w1", "dc_w2"))
            y = y + composable_attention(q, k, v, w1, w2, self.scale, self.cfg.composable_window, extras.docs)
        return self.proj_out(self._gated(y, v, extras).reshape(B, T, H * D))

    def _gated(self, y: Tensor, v: Tensor, extras: LayerExtras | None) -> Tensor:
        if self.xsa:
            y = xsa(y, v, extras.gates["xsa"])
        if self.out_gate:
            y = y * extras.gates["attn_out"].type_as(y).unsqueeze(-1)
        return y

    def proj_out(self, y: Tensor) -> Tensor:
        if self.lambdas is None:
            return self.proj(y)
        bias = None if self.proj.bias is None else self.proj.bias.type_as(y)
        return F.linear(y, self.lambdas[1].type_as(y) * self.proj.weight.type_as(y), bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, has_value_embed: bool):
        super().__init__()
        has_attn = layer not in cfg.skip_attn_layers
        self.attn_norm = make_norm(cfg) if has_attn else None
        self.attn = Attention(cfg, layer, has_value_embed) if has_attn else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.x0_mix = nn.Parameter(torch.empty(2)) if cfg.x0_mix else None
        # E4: x <- r·x + p·f(x) for the attention (index 0) and MLP (1) sublayers; MUDD's last block
        # takes its r and p from MUDD
        own = cfg.residual_scalars and not mudd_owned(cfg, layer)
        self.resid = nn.Parameter(torch.empty(2)) if own else None
        self.branch = nn.Parameter(torch.empty(2)) if own else None
        if own:
            self.resid.role, self.branch.role = "resid", "branch"

    def _add(self, x: Tensor, y: Tensor, sublayer: int, extras: LayerExtras | None) -> Tensor:
        if extras is not None and extras.mudd is not None:
            name = ("attn", "mlp")[sublayer]
            return extras.mudd[f"resid_{name}"] * x + extras.mudd[f"branch_{name}"] * y
        if self.resid is None:
            return x + y
        return self.resid[sublayer].type_as(x) * x + self.branch[sublayer].type_as(x) * y

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mask, rotary, cache=None,
                extras: LayerExtras | None = None) -> Tensor:
        if self.x0_mix is not None:
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        if self.attn is not None:
            source = x if extras is None or extras.attn_input is None else extras.attn_input
            x = self._add(x, self.attn(self.attn_norm(source), ve, mask, rotary, cache, extras), 0, extras)
            if extras is not None:
                x = self._inject(x, extras)
        return self._add(x, self.mlp(self.mlp_norm(x)), 1, extras)

    @staticmethod
    def _inject(x: Tensor, extras: LayerExtras) -> Tensor:
        """E5 and E2 after the attention sublayer: + g·x0 and + g·bigram (MUDD's gates on the last block)."""
        gates = extras.gates if extras.mudd is None else extras.mudd
        if "x0" in gates:
            x = x + gates["x0"].type_as(x) * extras.x0
        if extras.bigram is not None and "bigram" in gates:
            x = x + gates["bigram"].type_as(x) * extras.bigram
        return x


class GPT(nn.Module):
    """Validate the ModelConfig (config.validate) before building: shapes are not re-checked here."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        dim = cfg.model_dim
        build_input_embeddings(self, cfg, self.padded_vocab)  # wte, and wpe for learned positions
        self.value_embeds = nn.ModuleList(Table(cfg.vocab_size, dim) for _ in range(cfg.value_embeds))
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.bigram = BigramEmbedding(cfg) if cfg.bigram_vocab else None
        self.layer_value_embeds = LayerValueEmbeddings(cfg) if cfg.value_embed_layers else None
        self.blocks = nn.ModuleList(Block(cfg, i, self._value_table(i) is not None) for i in range(cfg.n_layer))
        # encoder layers i < n_layer//2 feed decoder layer n_layer-1-i; an odd middle layer gets none
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layer // 2)) if cfg.unet_skips else None
        # R1: one logit per skip connection; the connection adds σ(logit)·gate·source
        self.skip_logits = nn.Parameter(torch.empty(len(cfg.skip_connections))) if cfg.skip_connections else None
        self.gates = Gates(cfg) if gate_layout(cfg) else None
        self.mudd = MUDD(cfg) if cfg.mudd else None
        # YaRN's state (A2), saved with the weights so a checkpoint resumes and evaluates with it:
        # rotary's frequencies and the factor on the attention scale, for the long window `yarn_window`
        if cfg.yarn:
            self.register_buffer("yarn_freq", torch.empty(cfg.head_dim // 2))
            self.register_buffer("yarn_scale", torch.empty(()))
            self.register_buffer("yarn_window", torch.empty((), dtype=torch.long))
        self.final_norm = make_norm(cfg)
        self.lm_head = LMHead(cfg, self.padded_vocab)
        self.activation_dtype = torch.float32  # speedrun.prepare sets it for the device
        # token -> its longest proper prefix token (speedrun.prefix), set by speedrun.prepare for a prefix loss
        self.register_buffer("prefix_table", None, persistent=False)
        self.init_weights()

    @property
    def saved_layers(self) -> set[int]:
        """Blocks whose output later blocks read: skip sources (R1) and the attention input (R2)."""
        cfg = self.cfg
        return {a for a, _ in cfg.skip_connections} | ({cfg.attn_input_layer} if cfg.attn_input_layer >= 0 else set())

    def _value_table(self, layer: int) -> int | None:
        """The value-embedding table of `layer`: with value_embed_layers, the layer's own (keyed by
        the layer); else the first N layers use tables 0..N-1, and so do the last N, in the same
        order; the layers between use none."""
        if self.cfg.value_embed_layers:
            return layer if layer in self.cfg.value_embed_layers else None
        n, first_late = self.cfg.value_embeds, self.cfg.n_layer - self.cfg.value_embeds
        if layer < n:
            return layer
        return layer - first_late if layer >= first_late else None

    @property
    def head_weight(self) -> nn.Parameter:
        return self.wte.weight if self.lm_head.weight is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; also what to call after `to_empty()` on a meta-built model.

        The scheme follows cfg.norm. "rms" (the speedrun): matrices uniform with std
        0.5/sqrt(fan_in), embeddings N(0, 1) as nn.Embedding's default. "layernorm" (nanoGPT):
        matrices and embeddings N(0, 0.02), the residual projections (attention and MLP outputs)
        N(0, 0.02/sqrt(2*n_layer)). Then zero_init_proj / zero_init_head zero those projections /
        the head, biases start at zero, and the learned scalars at their neutral values.
        """
        cfg = self.cfg
        speedrun = cfg.norm == "rms"

        def matrix(w: Tensor, residual: bool = False) -> None:
            if speedrun:
                bound = 3 ** 0.5 * 0.5 * w.size(-1) ** -0.5
                w.uniform_(-bound, bound)
            else:
                normal_(w, 0.0, 0.02 / (2 * cfg.n_layer) ** 0.5 if residual else 0.02)

        for emb in self.modules():
            if isinstance(emb, nn.Embedding):
                normal_(emb.weight, 0.0, 1.0 if speedrun else 0.02)
        for block in self.blocks:
            if block.attn is not None:
                matrix(block.attn.qkv)
                matrix(block.attn.proj.weight, residual=True)
                if block.attn.v_mix is not None:
                    block.attn.v_mix.fill_(0.5)
            matrix(block.mlp.fc.weight)
            matrix(block.mlp.proj.weight, residual=True)
            if cfg.zero_init_proj:
                for proj in [block.mlp.proj] + ([block.attn.proj] if block.attn is not None else []):
                    proj.weight.zero_()
            if block.x0_mix is not None:
                block.x0_mix.copy_(torch.tensor([1.0, 0.0]))
        if self.lm_head.weight is not None:
            if cfg.zero_init_head:
                self.lm_head.weight.zero_()
            else:
                matrix(self.lm_head.weight)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        self._init_2026()
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    @torch.no_grad()
    def _init_2026(self) -> None:
        """The 2026 record's starting values (§3); every piece absent from a config is skipped."""
        cfg = self.cfg
        for module in (self.smear, self.bigram, self.layer_value_embeds, self.gates, self.mudd):
            if module is not None:
                module.reset_parameters()
        for block in self.blocks:
            if getattr(block.mlp, "h_amax", None) is not None:
                block.mlp.h_amax.zero_()  # M2's "no previous step yet"
            if block.resid is not None:
                block.resid.fill_(1.1 ** 0.5)
                block.branch.fill_(1.0)
            if block.attn is not None:
                if block.attn.lambdas is not None:
                    block.attn.lambdas.copy_(torch.tensor([0.5, 1.0]))
                if block.attn.ve_gate is not None:
                    block.attn.ve_gate.zero_()
                if cfg.zero_init_proj and not cfg.zero_init_attn_proj:  # A5: O uniform like Q, K, V
                    bound = 3 ** 0.5 * 0.5 * block.attn.proj.weight.size(-1) ** -0.5
                    block.attn.proj.weight.uniform_(-bound, bound)
        if self.skip_logits is not None:
            self.skip_logits.fill_(-1.5)
        if cfg.head_init_std:
            normal_(self.lm_head.weight, 0.0, cfg.head_init_std)
            self.wte.weight.copy_(self.lm_head.weight)
        if cfg.yarn and not self.yarn_freq.is_meta:  # meta: no values yet, and pow there imports torch._dynamo
            self.set_yarn([])

    @torch.no_grad()
    def init_derived_buffers(self) -> None:
        """Refill the buffers that are not saved because they follow from the config (the bigram
        sign table): what a model built on the meta device and loaded from weights needs."""
        if self.bigram is not None and self.bigram.signs is not None:
            self.bigram.fill_signs()

    @torch.no_grad()
    def set_yarn(self, long_windows: list[int]) -> None:
        """YaRN's state after the long window has grown through `long_windows` (tokens, in order)."""
        freq, scale = yarn_state(base_frequencies(self.cfg, self.yarn_freq.device), 1.0, long_windows)
        self.yarn_freq.copy_(freq)
        self.yarn_scale.fill_(scale)
        self.yarn_window.fill_(long_windows[-1] if long_windows else 0)

    def _rotary(self, past: int, T: int, device) -> dict | None:
        """Rotary's tables for positions past..past+T: "plain", and "paired" for paired-head layers."""
        cfg = self.cfg
        if cfg.positional != "rotary":
            return None
        freq = self.yarn_freq if cfg.yarn else base_frequencies(cfg, device)
        tables = {"plain": tuple(t[past:] for t in rotary_tables_from(freq, past + T))}
        if cfg.paired_head_layers:
            tables["paired"] = paired_tables(freq, past, T)
        return tables

    def forward(self, idx: Tensor, targets: Tensor | None = None, window_tokens: int | Tensor = NO_WINDOW,
                cache=None, short_window: int | Tensor | None = None, future_weights: Tensor | None = None,
                prefix_weight: Tensor | None = None) -> Tensor:
        """idx (B, T) int -> mean cross-entropy against targets (B, T), or, with targets None,
        logits (B, T, vocab_size) in float32. `window_tokens` may be a 0-d int tensor on the
        model's device, so a compiled model need not recompile as the window grows; so may
        `short_window`, the S layers' window where a schedule sets it (else half the long). With a `cache`
        (speedrun.generate.KVCache), idx holds only the tokens after those already cached, and the
        cache's window applies. `future_weights` (multi-token prediction) and `prefix_weight` (the
        prefix-token loss, with `prefix_table` set) weigh the training loss's terms (speedrun.loss)."""
        cfg = self.cfg
        T = idx.size(1)
        past = 0 if cache is None else cache.length
        x = embed(self, idx, past, self.activation_dtype)
        if self.smear is not None:
            x = self.smear(x)
        if cfg.norm == "rms":
            x = rms_norm(x)
        x0 = x
        tables = [emb(idx).to(self.activation_dtype) for emb in self.value_embeds]
        if self.layer_value_embeds is not None:
            tables = {i: t.to(self.activation_dtype) for i, t in self.layer_value_embeds(idx).items()}
        masks = build_masks(idx, window_tokens, cfg, short_window) if cache is None else cache.masks(idx)
        if cfg.paired_head_layers:  # their own masks over 2T rows (the model refuses a cache: caches_keys)
            paired = build_masks(idx, window_tokens, cfg, short_window, paired=True)
            masks.update({(letter, "paired"): mask for letter, mask in paired.items()})
        rotary = self._rotary(past, T, idx.device)
        state = self._stream_state(idx, x0)
        x = state.saved["c0"]
        n_skips = 0 if self.skip_weights is None else self.skip_weights.numel()
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= cfg.n_layer - n_skips:
                x = x + self.skip_weights[i - (cfg.n_layer - n_skips)] * skips.pop()
            x, extras = self._enter_block(i, x, state)
            table = self._value_table(i)
            x = block(x, x0, None if table is None else tables[table], self._mask(masks, i), rotary,
                      None if cache is None else cache.layers[i], extras)
            if i < n_skips:
                skips.append(x)
            if i in self.saved_layers:
                state.saved[f"out{i}"] = x
        if self.mudd is not None:
            x = self.mudd.final_mix(x, self._final_sources(state, tables))
        loss_terms = {}
        if future_weights is not None:
            loss_terms["future_weights"] = future_weights
        if prefix_weight is not None and targets is not None:
            loss_terms.update(prefix_targets=self.prefix_table[targets], prefix_weight=prefix_weight)
        return self.lm_head(self.final_norm(x), self.wte.weight if cfg.tied_head else None, targets, **loss_terms)

    def _mask(self, masks: dict, layer: int):
        letter = self.cfg.window_letter(layer)
        return masks[(letter, "paired")] if layer in self.cfg.paired_head_layers else masks[letter]

    def _stream_state(self, idx: Tensor, x0: Tensor) -> StreamState:
        """The 2026 pieces' per-pass state: the bigram term, the first generator's gates and c0, the
        stream entering block 0 (x0 plus the injected bigram term)."""
        bigram = None if self.bigram is None else self.bigram(idx).to(x0.dtype)
        gates = {} if self.gates is None else self.gates.first(x0)
        c0 = x0
        if bigram is not None:
            c0 = x0 + gates[("bigram", attention_layers(self.cfg)[0])] * bigram
        docs = document_ids(idx) if self.cfg.composable_layers else None
        q_scale = self.yarn_scale if self.cfg.yarn else None
        return StreamState(gates, bigram, {"c0": c0}, docs, q_scale, x0)

    def _enter_block(self, i: int, x: Tensor, state: StreamState) -> tuple[Tensor, LayerExtras | None]:
        """Before block i: the second generator's gates, skip connections into i, and, on MUDD's last
        block, its mix; then the block's LayerExtras (None when the model has no 2026 pieces)."""
        cfg = self.cfg
        if self.gates is not None and i == self.gates.split:
            state.gates.update(self.gates.second(x))
        for k, (source, target) in enumerate(cfg.skip_connections):
            if target == i:
                x = x + torch.sigmoid(self.skip_logits[k]).type_as(x) * state.gates[("skip", i)] * state.saved[f"out{source}"]
        if not self.extras_on:
            return x, None
        saved = state.saved
        extras = LayerExtras(gates={name: v for (name, layer), v in state.gates.items() if layer == i},
                             bigram=state.bigram if i != attention_layers(cfg)[0] else None,
                             x0=state.x0, docs=state.docs, q_scale=state.q_scale)
        if 0 <= cfg.attn_input_layer < i:
            extras.attn_input = saved[f"out{cfg.attn_input_layer}"]
        if self.mudd is not None and i == cfg.n_layer - 1:
            mu = self.mudd.last_block(x)
            cs = saved[f"out{cfg.attn_input_layer}"]
            saved["last_in"] = x
            extras.mudd, extras.x0 = mu, saved["c0"]
            extras.v_extra = mu["v_c0"] * saved["c0"] + mu["v_cs"] * cs + mu["v_x"] * x
            x = (1 + mu["mix_x"]) * x + mu["mix_c0"] * saved["c0"] + mu["mix_cs"] * cs
        return x, extras

    def _final_sources(self, state: StreamState, tables) -> dict[str, Tensor]:
        saved, cfg = state.saved, self.cfg
        sources = {"c0": saved["c0"], "cs": saved[f"out{cfg.attn_input_layer}"], "last_in": saved["last_in"]}
        if cfg.value_embed_layers:
            sources["ve"] = tables[cfg.value_embed_layers[0]]
        sources.update({f"skip{a}": saved[f"out{a}"] for a, _ in cfg.skip_connections})
        return sources

    @property
    def caches_keys(self) -> bool:
        """Whether decoding may use a KV cache: not with the 2026 pieces that read the previous token
        or a layer's own values (smear, bigram, key offset, paired heads, XSA, composable attention);
        speedrun.generate then recomputes the whole sequence for each new token."""
        cfg = self.cfg
        return not (cfg.smear_gate or cfg.bigram_vocab or cfg.key_offset or cfg.paired_head_layers or cfg.xsa_layers
                    or cfg.composable_layers)

    @property
    def extras_on(self) -> bool:
        """Whether any block takes LayerExtras (a 2026-record technique is on)."""
        cfg = self.cfg
        return bool(self.gates is not None or self.mudd is not None or self.bigram is not None or cfg.attn_input_layer >= 0
                    or cfg.yarn or cfg.value_embed_layers)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role. A parameter tagged with a `role` attribute by the module that
        owns it (the 2026 pieces: value_embed, gate, smear, resid, branch, mudd, ...) has that role;
        the rest are decided by what holds them, so a new module's parameters find their group:
        "embed" (any nn.Embedding: token, position, value tables), "head" (the LMHead's untied
        weight), "scalar" (everything below 2-D, wherever it lives) and "hidden" (every other
        matrix, including the (3, d, d) qkv stacks). Each parameter lands in one group, in ROLES order."""
        groups: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
        holder = {}
        for module in self.modules():
            kind = "embed" if isinstance(module, nn.Embedding) else "head" if isinstance(module, LMHead) else None
            for p in module.parameters(recurse=False):
                holder[p] = kind
        for p in self.parameters():
            groups[getattr(p, "role", None) or ("scalar" if p.ndim < 2 else holder[p] or "hidden")].append(p)
        return {name: params for name, params in groups.items() if params}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4; embedding lookups
        are free) plus attention's two (T x T x head) products, 12 * dim per attended key. Keys are
        counted as the causal mask and the largest window (window_max, shrunk on S layers) allow
        under the configured window rule; document boundaries depend on the data and are ignored."""
        cfg = self.cfg
        matmul = sum(p.numel() for p in self.blocks.parameters() if p.ndim >= 2) + self.head_weight.numel()
        window = cfg.window_max if cfg.sliding_window else NO_WINDOW
        q = torch.arange(seq_len, dtype=torch.float64)
        attention = 0.0
        for i, block in enumerate(self.blocks):
            if block.attn is not None:
                reach = farthest_key(window, SHRINK[cfg.window_letter(i)], window_rule_block(cfg))
                if cfg.window_granularity == "block" and reach < seq_len:
                    reach = q % cfg.window_block + 1 + (reach - cfg.window_block)  # the diagonal block's keys vary
                keys = torch.minimum(q + 1, torch.as_tensor(reach, dtype=torch.float64)).mean().item()
                attention += 12 * cfg.n_head * cfg.head_dim * keys
        return 6.0 * matmul + attention
