"""The pre-norm decoder block: h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN dense or MoE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, AttnContext
from .moe import MLP, MoE, MoEStats
from .norm import RMSNorm


@dataclass
class LayerCache:
    """One layer's inference state: the latent KV [B, max_seq, kv_lora_rank + rope_dim]."""

    latent: torch.Tensor


@dataclass
class BlockStats:
    max_logit_H: torch.Tensor | None  # per-head max attention logit (when recorded)
    moe: MoEStats | None  # None for dense layers


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLA(cfg, layer_idx)
        moe = cfg.is_moe_layer(layer_idx) or (layer_idx >= cfg.num_hidden_layers and cfg.is_moe)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None):
        a, max_logit = self.self_attn(self.input_layernorm(x_BTD), ctx, None if cache is None else cache.latent)
        h = x_BTD + a
        if isinstance(self.mlp, MoE):
            f, moe_stats = self.mlp(self.post_attention_layernorm(h))
        else:
            f, moe_stats = self.mlp(self.post_attention_layernorm(h)), None
        return h + f, BlockStats(max_logit, moe_stats)
