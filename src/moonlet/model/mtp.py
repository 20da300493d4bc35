"""Multi-token prediction (DeepSeek-V3 MTP): one extra block per predicted depth.

Depth k at position i sees the depth-(k-1) hidden state h_i (the main model's final-normed output
for k = 1) and the embedding of token t_{i+k}, and predicts t_{i+k+1}:
    h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)])   (embedding first, as the weights are laid out)
    h  = shared_head.norm(Block(h'))                     logits = lm_head(h)   (embedding and head shared)
The module's parameters sit directly on it (self_attn, mlp, norms), so its state dict is exactly
the checkpoint's `model.layers.{num_hidden_layers + k - 1}.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import AttnContext
from .block import Block
from .hyper import collapse_streams, expand_streams
from .norm import RMSNorm


class SharedHead(nn.Module):
    """Holds only the norm; the head matrix is the main lm_head (checkpoints store a copy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class MTPModule(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, eps=cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, eps=cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor, ctx: AttnContext, cache=None):
        """(normed hidden [B,T,D] to feed lm_head or the next depth, block stats)."""
        x = self.eh_proj(torch.cat((self.enorm(emb_BTD), self.hnorm(h_BTD)), dim=-1))
        if self.hc_mult is not None:  # mHC: the depth's block runs on its own streams
            x, stats = super().forward(expand_streams(x, self.hc_mult), ctx, cache)
            return self.shared_head.norm(collapse_streams(x)), stats
        x, stats = super().forward(x, ctx, cache)
        return self.shared_head.norm(x), stats
