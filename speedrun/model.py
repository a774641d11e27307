"""The GPT: one plain nn.Module whose every ModelConfig field is a switch.

With the gpt2-speedrun preset it is modded-nanogpt's record model of 2025-01-26 (QK-norm, half
rotary, value embeddings, U-net skips, x0 mixing, ReLU^2, softcapped FP8 head, document-causal
sliding-window FlexAttention); with gpt2-baseline it is nanoGPT's GPT-2 (learned positions,
LayerNorm, GELU, biases, tied head, causal SDPA).

Weights are stored in fp32 and cast to the activations' dtype where they are used. There is no
autocast: `speedrun.prepare` picks the activation dtype (ModelConfig.activation_dtype; bf16
on CUDA, as the record), the embedding lookups start the residual stream in it, and every matmul
and attention then runs in it; only rotary's rotation and the logits are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.attention import NO_WINDOW, SHRINK, attend, build_masks, farthest_key, window_rule_block
from speedrun.config import ModelConfig
from speedrun.embed import build_input_embeddings, embed
from speedrun.loss import LMHead


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


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


def rotary_tables(seq_len: int, cfg: ModelConfig, device) -> tuple[Tensor, Tensor]:
    """cos and sin, (T, head_dim/2), recomputed per call: they are cheap, and holding no buffers
    keeps the model trivially buildable on the meta device."""
    half = cfg.head_dim // 2
    if cfg.rotary_half_truncate:
        # only the first half of the pairs rotate; the rest carry position-free features
        freq = (1.0 / cfg.rotary_base) ** torch.linspace(0, 1, half // 2, device=device)
        freq = torch.cat([freq, freq.new_zeros(half - half // 2)])
    else:
        freq = (1.0 / cfg.rotary_base) ** (torch.arange(half, device=device) / half)
    theta = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freq)
    return theta.cos(), theta.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, H, D) by position; dimension i pairs with i + D/2."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, has_value_embed: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_head * cfg.head_dim
        # q, k and v stacked on a leading axis, so Muon orthogonalises each on its own
        self.qkv = nn.Parameter(torch.empty(3, inner, cfg.model_dim))
        # NorMuon's tag (a plain attribute, so not in the state_dict): how q and k split into heads
        self.qkv.matrix_layout = ("qkv", cfg.head_dim)
        self.qkv_bias = nn.Parameter(torch.empty(3 * inner)) if cfg.bias else None
        # v = a*v (+ b*value_embedding); only layers with a value table get b, so no parameter is unused
        self.v_mix = nn.Parameter(torch.empty(2 if has_value_embed else 1)) if cfg.value_embeds else None
        self.proj = Linear(inner, cfg.model_dim, cfg.bias)
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5

    def forward(self, x: Tensor, ve: Tensor | None, mask, rotary: tuple[Tensor, Tensor] | None,
                cache=None) -> Tensor:
        B, T, _ = x.shape
        bias = None if self.qkv_bias is None else self.qkv_bias.type_as(x)
        qkv = F.linear(x, self.qkv.flatten(0, 1).type_as(x), bias)
        q, k, v = qkv.view(B, T, 3 * self.cfg.n_head, self.cfg.head_dim).chunk(3, dim=-2)
        if self.cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if ve is not None:
            v = self.v_mix[0] * v + self.v_mix[1] * ve.view_as(v)
        elif self.v_mix is not None:
            v = self.v_mix[0] * v
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = attend(q, k, v, mask, self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.model_dim
        self.fc = Linear(cfg.model_dim, hidden, cfg.bias)
        self.proj = Linear(hidden, cfg.model_dim, cfg.bias)
        # NorMuon's tag: the record stores this matrix transposed, and NorMuon treats it so
        self.proj.weight.matrix_layout = ("mlp_out",)
        self.relu2 = cfg.activation == "relu2"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, has_value_embed: bool):
        super().__init__()
        has_attn = layer not in cfg.skip_attn_layers
        self.attn_norm = make_norm(cfg) if has_attn else None
        self.attn = Attention(cfg, has_value_embed) if has_attn else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.x0_mix = nn.Parameter(torch.empty(2)) if cfg.x0_mix else None

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mask, rotary, cache=None) -> Tensor:
        if self.x0_mix is not None:
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x), ve, mask, rotary, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Validate the ModelConfig (config.validate) before building: shapes are not re-checked here."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        dim = cfg.model_dim
        build_input_embeddings(self, cfg, self.padded_vocab)  # wte, and wpe for learned positions
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, dim) for _ in range(cfg.value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i, self._value_table(i) is not None) for i in range(cfg.n_layer))
        # encoder layers i < n_layer//2 feed decoder layer n_layer-1-i; an odd middle layer gets none
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.final_norm = make_norm(cfg)
        self.lm_head = LMHead(cfg, self.padded_vocab)
        self.activation_dtype = torch.float32  # speedrun.prepare sets it for the device
        self.init_weights()

    def _value_table(self, layer: int) -> int | None:
        """The value-embedding table of `layer`: the first N layers use tables 0..N-1, and so do
        the last N, in the same order; the layers between use none."""
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
                w.normal_(0.0, 0.02 / (2 * cfg.n_layer) ** 0.5 if residual else 0.02)

        for emb in self.modules():
            if isinstance(emb, nn.Embedding):
                emb.weight.normal_(0.0, 1.0 if speedrun else 0.02)
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
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, idx: Tensor, targets: Tensor | None = None, window_tokens: int | Tensor = NO_WINDOW,
                cache=None, short_window: int | Tensor | None = None) -> Tensor:
        """idx (B, T) int -> mean cross-entropy against targets (B, T), or, with targets None,
        logits (B, T, vocab_size) in float32. `window_tokens` may be a 0-d int tensor on the
        model's device, so a compiled model need not recompile as the window grows; so may
        `short_window`, the S layers' window where a schedule sets it (else half the long). With a `cache`
        (speedrun.generate.KVCache), idx holds only the tokens after those already cached, and the
        cache's window applies."""
        cfg = self.cfg
        T = idx.size(1)
        past = 0 if cache is None else cache.length
        x = embed(self, idx, past, self.activation_dtype)
        if cfg.norm == "rms":
            x = rms_norm(x)
        x0 = x
        tables = [emb(idx).to(self.activation_dtype) for emb in self.value_embeds]
        masks = build_masks(idx, window_tokens, cfg, short_window) if cache is None else cache.masks(idx)
        rotary = None
        if cfg.positional == "rotary":
            rotary = tuple(t[past:] for t in rotary_tables(past + T, cfg, idx.device))
        n_skips = 0 if self.skip_weights is None else self.skip_weights.numel()
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= cfg.n_layer - n_skips:
                x = x + self.skip_weights[i - (cfg.n_layer - n_skips)] * skips.pop()
            table = self._value_table(i)
            x = block(x, x0, None if table is None else tables[table], masks[cfg.window_letter(i)], rotary,
                      None if cache is None else cache.layers[i])
            if i < n_skips:
                skips.append(x)
        return self.lm_head(self.final_norm(x), self.wte.weight if cfg.tied_head else None, targets)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role, decided by what holds them, so a new module's parameters
        find their group: "embed" (any nn.Embedding: token, position, value tables), "head" (the
        LMHead's untied weight), "scalar" (everything below 2-D, wherever it lives) and "hidden"
        (every other matrix, including the (3, d, d) qkv stacks). Each parameter lands in one group."""
        groups: dict[str, list[nn.Parameter]] = {"hidden": [], "embed": [], "head": [], "scalar": []}
        role = {}
        for module in self.modules():
            kind = "embed" if isinstance(module, nn.Embedding) else "head" if isinstance(module, LMHead) else None
            for p in module.parameters(recurse=False):
                role[p] = kind
        for p in self.parameters():
            groups["scalar" if p.ndim < 2 else role[p] or "hidden"].append(p)
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
