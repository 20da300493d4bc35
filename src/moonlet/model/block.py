"""The pre-norm decoder block: h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN dense or MoE.

Optional levers (config switches, all off by default): DSA replaces MLA by `SparseMLA`; Engram adds
its memory to the residual before attention; mHC carries n residual streams [B,T,n,D] and wraps
attention and FFN each in a `HyperConnection` (x -> H_res x + H_post^T f(H_pre x)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, AttnContext
from .engram import Engram
from .hyper import HyperConnection
from .moe import MLP, MoE, MoEStats
from .norm import RMSNorm
from .sparse_attention import SparseMLA


@dataclass
class LayerCache:
    """One layer's inference state, every tensor indexed [batch, position(slot), ...]:
    latent [B, max_seq, kv_lora_rank + rope_dim]; with DSA index_keys [B, max_seq, index_head_dim];
    at Engram layers engram_ids [B, max_seq] int64 (compressed ids), engram_rows [B, max_seq, d_mem]
    (gathered memory rows) and engram_gate [B, max_seq, M] (gates, M = hc_mult or 1)."""

    latent: torch.Tensor
    index_keys: torch.Tensor | None = None
    engram_ids: torch.Tensor | None = None
    engram_rows: torch.Tensor | None = None
    engram_gate: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cfg: ModelConfig, layer_idx: int, batch: int, max_seq: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "LayerCache":
        """Zeroed state for layer `layer_idx` (>= num_hidden_layers: an MTP depth)."""
        kw = dict(dtype=dtype, device=device)
        c = cls(torch.zeros(batch, max_seq, cfg.kv_lora_rank + cfg.qk_rope_head_dim, **kw))
        if cfg.is_dsa:
            c.index_keys = torch.zeros(batch, max_seq, cfg.index_head_dim, **kw)
        if cfg.is_engram_layer(layer_idx):
            d_mem = (cfg.engram_max_ngram - 1) * cfg.engram_dim_per_order
            c.engram_ids = torch.zeros(batch, max_seq, dtype=torch.int64, device=device)
            c.engram_rows = torch.zeros(batch, max_seq, d_mem, **kw)
            c.engram_gate = torch.zeros(batch, max_seq, cfg.hc_mult or 1, **kw)
        return c


def allocate_cache(cfg: ModelConfig, batch: int, max_seq: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, mtp: bool = True) -> list[LayerCache]:
    """Caches for every main layer, then (mtp=True) every MTP depth, as CausalLM(cache=...) expects."""
    n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return [LayerCache.allocate(cfg, i, batch, max_seq, dtype, device) for i in range(n)]


@dataclass
class BlockStats:
    max_logit_H: torch.Tensor | None  # per-head max attention logit (when recorded)
    moe: MoEStats | None  # None for dense layers
    indexer_loss: torch.Tensor | None = None  # DSA indexer KL (training, warmup/sparse stage)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = SparseMLA(cfg, layer_idx) if cfg.is_dsa else MLA(cfg, layer_idx)
        moe = cfg.is_moe_layer(layer_idx) or (layer_idx >= cfg.num_hidden_layers and cfg.is_moe)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hc_mult = cfg.hc_mult
        if cfg.hc_mult is not None:
            self.attn_hc = HyperConnection(cfg)
            self.ffn_hc = HyperConnection(cfg)
        self.engram = Engram(cfg, layer_idx) if cfg.is_engram_layer(layer_idx) else None

    def _attn(self, x_BTD: torch.Tensor, ctx: AttnContext, cache: LayerCache | None):
        h = self.input_layernorm(x_BTD)
        if isinstance(self.self_attn, SparseMLA):
            return self.self_attn(h, ctx, None if cache is None else cache.latent,
                                  None if cache is None else cache.index_keys)
        a, max_logit = self.self_attn(h, ctx, None if cache is None else cache.latent)
        return a, max_logit, None

    def _ffn(self, h_BTD: torch.Tensor):
        if isinstance(self.mlp, MoE):
            return self.mlp(self.post_attention_layernorm(h_BTD))
        return self.mlp(self.post_attention_layernorm(h_BTD)), None

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None,
                engram_rows: torch.Tensor | None = None):
        """x: [B,T,D], or the streams [B,T,n,D] with mHC. engram_rows [B,T,d_mem]: this layer's
        prefetched memory rows (Engram layers only). Returns (same shape as x, BlockStats)."""
        if self.engram is not None:
            X = x if self.hc_mult is not None else x[:, :, None]
            Y = self.engram(X, engram_rows, ctx.positions_BT if cache is not None else None, cache)
            x = x + (Y if self.hc_mult is not None else Y[:, :, 0])
        if self.hc_mult is None:
            a, max_logit, idx_loss = self._attn(x, ctx, cache)
            h = x + a
            f, moe_stats = self._ffn(h)
            return h + f, BlockStats(max_logit, moe_stats, idx_loss)
        pre, post, res = self.attn_hc.maps(x)
        a, max_logit, idx_loss = self._attn(HyperConnection.read(x, pre), ctx, cache)
        x = HyperConnection.write(x, a, post, res)
        pre, post, res = self.ffn_hc.maps(x)
        f, moe_stats = self._ffn(HyperConnection.read(x, pre))
        return HyperConnection.write(x, f, post, res), BlockStats(max_logit, moe_stats, idx_loss)
