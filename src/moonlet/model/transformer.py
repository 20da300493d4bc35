"""`Transformer` (embeddings, blocks, final norm) and `CausalLM` (head, losses, MTP).

Module and parameter names follow the Hugging Face DeepseekV3ForCausalLM layout
(`model.embed_tokens`, `model.layers.{i}.self_attn.q_a_proj`, `lm_head`, ...); MTP depths live in
`mtp.{k}` and map to checkpoint layers `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from .attention import AttnContext
from .block import Block, BlockStats, LayerCache
from .loss import cross_entropy
from .moe import MoE, Experts, Router
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] (only the last position when last_only=True)
    loss: torch.Tensor | None = None  # ce + mtp_lambda * mean_k mtp_ce_k + balance losses
    ce_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # final-normed hidden [B, T, D] (MTP's input)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    expert_load: list[torch.Tensor] = field(default_factory=list)  # per MoE layer of the main model, [E]
    max_logits: list[torch.Tensor] = field(default_factory=list)  # per layer [H], when recorded


def make_context(
    rotary: RotaryEmbedding,
    positions_BT: torch.Tensor,
    dtype: torch.dtype,
    with_cache: bool,
    absorbed: bool,
    record_max_logit: bool = False,
    kv_len: int | None = None,
) -> AttnContext:
    cos, sin = rotary(positions_BT, dtype)
    mask, L = None, 0
    if with_cache:
        L = int(positions_BT.max()) + 1 if kv_len is None else kv_len
        slots = torch.arange(L, device=positions_BT.device)
        mask = slots[None, None, None, :] <= positions_BT[:, None, :, None]  # [B,1,T,L]
    return AttnContext(cos, sin, positions_BT, mask, L, absorbed, record_max_logit)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, x_BTD: torch.Tensor, ctx: AttnContext, cache: Sequence[LayerCache] | None = None):
        stats: list[BlockStats] = []
        for i, layer in enumerate(self.layers):
            x_BTD, s = layer(x_BTD, ctx, None if cache is None else cache[i])
            stats.append(s)
        return self.norm(x_BTD), stats


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- construction -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, seed: int | None = None) -> "CausalLM":
        """Normal(0, std) matrices and embeddings, unit norms, zero biases; output projections scaled
        by 1/sqrt(2 * layers) so the residual stream does not grow with depth."""
        std = self.config.initializer_range if std is None else std
        g = None
        if seed is not None:
            g = torch.Generator(device="cpu").manual_seed(seed)
        out_scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)

        def normal_(t: torch.Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(s).to(t.dtype))

        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, std * (out_scale if name.endswith(("o_proj", "down_proj")) else 1.0))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                normal_(m.weight, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                normal_(m.weight, std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                normal_(m.gate_proj, std)
                normal_(m.up_proj, std)
                normal_(m.down_proj, std * out_scale)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_balance_alpha(self, alpha: float) -> None:
        for m in self.moe_layers():
            m.aux_alpha = alpha

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: Sequence[LayerCache] | None = None,
        absorbed: bool | None = None,
        mtp_labels: Sequence[torch.Tensor] | None = None,
        mtp_lambda: float = 0.3,
        run_mtp: bool | None = None,
        record_max_logit: bool = False,
        last_only: bool = False,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput(logits [B, T, V], ...).

        labels [B, T]: next-token targets (IGNORE_INDEX where no loss); gives ce_loss and, with MTP
          depths, their losses (depth k at position i predicts labels[i + k] unless mtp_labels given).
        positions [B, T]: absolute positions (default 0..T-1); required with a cache, where they are
          also the cache slots written.
        cache: per-layer LayerCache (main layers, then MTP depths), as built by moonlet.infer.cache.
        absorbed: attention form (default: absorbed with a cache; without one, absorbed only where it
          costs no more FLOPs than naive, i.e. 2 * kv_lora_rank <= qk_nope_head_dim + v_head_dim, since
          its one shared latent "head" makes far better-shaped matmuls).
        """
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is passed")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if absorbed is None:
            c = self.config
            absorbed = cache is not None or 2 * c.kv_lora_rank <= c.qk_nope_head_dim + c.v_head_dim
        x = self.model.embed_tokens(input_ids)
        ctx = make_context(self.model.rotary, positions, x.dtype, cache is not None, absorbed, record_max_logit)
        hidden, stats = self.model(x, ctx, cache)
        out = ModelOutput(logits=self.lm_head(hidden[:, -1:] if last_only else hidden), hidden=hidden)
        self._collect(out, stats)
        if labels is not None:
            out.ce_loss = cross_entropy(out.logits.flatten(0, 1), labels.reshape(-1), IGNORE_INDEX)
        if run_mtp is None:
            run_mtp = labels is not None and cache is None
        if run_mtp and len(self.mtp):
            self._mtp_forward(out, input_ids, ctx, labels, mtp_labels, record_max_logit)
        if labels is not None:
            loss = out.ce_loss
            if out.mtp_losses:
                loss = loss + mtp_lambda * torch.stack(out.mtp_losses).mean()
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            out.loss = loss
        return out

    def _collect(self, out: ModelOutput, stats: list[BlockStats], main: bool = True) -> None:
        for s in stats:
            if s.max_logit_H is not None:
                out.max_logits.append(s.max_logit_H)
            if s.moe is not None:
                if main:
                    out.expert_load.append(s.moe.load_E)
                if s.moe.aux_loss is not None:
                    out.aux_loss = s.moe.aux_loss if out.aux_loss is None else out.aux_loss + s.moe.aux_loss

    def _mtp_forward(self, out, input_ids, ctx, labels, mtp_labels, record_max_logit) -> None:
        h = out.hidden
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            Tk = T - k
            if Tk <= 0:
                break
            ctx_k = AttnContext(ctx.cos_BTR[:, :Tk], ctx.sin_BTR[:, :Tk], ctx.positions_BT[:, :Tk],
                                absorbed=ctx.absorbed, record_max_logit=record_max_logit)
            emb = self.model.embed_tokens(input_ids[:, k:])
            h, s = module(h[:, :Tk], emb, ctx_k)
            self._collect(out, [s], main=False)
            logits = self.lm_head(h)
            out.mtp_logits.append(logits)
            if labels is not None:
                target = labels[:, k:] if mtp_labels is None else mtp_labels[k - 1][:, :Tk]
                if (target != IGNORE_INDEX).any():
                    out.mtp_losses.append(cross_entropy(logits.flatten(0, 1), target.reshape(-1), IGNORE_INDEX))

    # ---- interop ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset: str, **kwargs) -> "CausalLM":
        from ..interop.hf import from_pretrained

        return from_pretrained(path_or_preset, **kwargs)

    def save_pretrained(self, path, **kwargs):
        from ..interop.hf import save_pretrained

        return save_pretrained(self, path, **kwargs)
