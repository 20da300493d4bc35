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
from .engram import Engram, EngramHashing, prefetch_rows
from .hyper import HyperConnection, collapse_streams, expand_streams
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
    indexer_loss: torch.Tensor | None = None  # DSA: sum over layers of the indexer KL (training mode)


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
        self.engram_hash = EngramHashing(cfg) if cfg.engram_layers is not None else None

    def forward(self, x_BTD: torch.Tensor, ctx: AttnContext, cache: Sequence[LayerCache] | None = None,
                engram_rows: dict[int, torch.Tensor] | None = None):
        """x [B,T,D] embeddings -> (final-normed hidden [B,T,D], per-layer stats). engram_rows: the
        prefetched memory rows of each Engram layer (`prefetch_rows`). With mHC the blocks carry
        hc_mult streams, entered as copies of x and averaged before the final norm."""
        stats: list[BlockStats] = []
        if self.cfg.hc_mult is not None:
            x_BTD = expand_streams(x_BTD, self.cfg.hc_mult)
        for i, layer in enumerate(self.layers):
            rows = None if engram_rows is None else engram_rows.get(i)
            x_BTD, s = layer(x_BTD, ctx, None if cache is None else cache[i], rows)
            stats.append(s)
        if self.cfg.hc_mult is not None:
            x_BTD = collapse_streams(x_BTD)
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
            elif isinstance(m, nn.LayerNorm):  # the DSA indexer's key norm
                m.reset_parameters()
        for m in self.modules():  # modules with their own init (after their children's generic one)
            if isinstance(m, HyperConnection):
                m.reset_parameters(generator=g)
            elif isinstance(m, (Engram, EngramHashing)):
                m.reset_parameters()
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
        engram_rows = None
        if self.model.engram_hash is not None:  # hash + gather every Engram layer's rows before any block
            engram_rows = prefetch_rows(self.model.engram_hash, self.model.layers, input_ids, positions, cache,
                                        device=x.device, dtype=x.dtype)
        ctx = make_context(self.model.rotary, positions, x.dtype, cache is not None, absorbed, record_max_logit)
        hidden, stats = self.model(x, ctx, cache, engram_rows)
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
            if out.indexer_loss is not None:  # reaches only the indexers (their inputs are detached)
                loss = loss + out.indexer_loss
            out.loss = loss
        return out

    def _collect(self, out: ModelOutput, stats: list[BlockStats], main: bool = True) -> None:
        for s in stats:
            if s.indexer_loss is not None:
                out.indexer_loss = s.indexer_loss if out.indexer_loss is None else out.indexer_loss + s.indexer_loss
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
