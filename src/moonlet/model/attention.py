"""Multi-head Latent Attention (MLA), in its two forms over the same weights.

*naive*: expand the KV latent into per-head keys/values (K = [k_nope | shared k_pe], V) and run MHA.
Cheapest for training and for long prefills.
*absorbed*: fold W_UK into the query and W_UV after the attention, so attention runs directly over
the cached latent [c_kv (normalized) | k_pe (roped)]: MQA with a (kv_lora_rank + rope)-dim key and a
kv_lora_rank-dim value shared by all heads. Cheapest for decode; the cache never grows per head.

Parameter names are the Hugging Face names, so state dicts map 1:1 to DeepSeek-V3 checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cpu import CPU_NATIVE_BF16
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


@dataclass
class AttnContext:
    """What every attention layer of one forward shares, computed once per forward.

    positions_BT: absolute position of each input token; it is also the cache slot the token's
      latent is written to, so a sequence's slots 0..p always hold its own tokens.
    mask_B1TL: boolean "may attend" mask over cache slots [0, kv_len), or None for a plain causal
      mask over the current chunk (no cache).
    """

    cos_BTR: torch.Tensor
    sin_BTR: torch.Tensor
    positions_BT: torch.Tensor
    mask_B1TL: torch.Tensor | None = None
    kv_len: int = 0
    absorbed: bool = False
    record_max_logit: bool = False


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        D, H, bias = cfg.hidden_size, self.n_heads, cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    # ---- pieces ---------------------------------------------------------------------------------
    def q_latent(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The query latent c^Q = RMSNorm(q_a_proj(x)) [B,T,q_lora_rank] (the DSA indexer reads it too)."""
        return self.q_a_layernorm(self.q_a_proj(x_BTD))

    def query(self, x_BTD: torch.Tensor, ctx: AttnContext, qr_BTQ: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope [B,T,H,dn], roped q_pe [B,T,H,dr]); qr_BTQ: c^Q when already computed."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_latent(x_BTD) if qr_BTQ is None else qr_BTQ)
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, ctx.cos_BTR, ctx.sin_BTR, self.interleaved)

    def latent(self, x_BTD: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """What the cache stores per token: [RMSNorm(c_kv) | RoPE(k_pe)], [B, T, kv_lora_rank + dr]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat(
            (self.kv_a_layernorm(c_kv), apply_rope(k_pe, ctx.cos_BTR, ctx.sin_BTR, self.interleaved)), dim=-1
        )

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj viewed per head: W_UK [H, dn, C] and W_UV [H, dv, C]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def expand_kv(self, latent_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head K [B,L,H,dn+dr] and V [B,L,H,dv] from the latent (the naive form)."""
        B, L, _ = latent_BLC.shape
        c_kv, k_pe = latent_BLC.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, L, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, L, self.n_heads, self.rope_dim)), dim=-1)
        return k, v

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self, x_BTD: torch.Tensor, ctx: AttnContext, cache_BSC: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output [B,T,D], per-head max pre-softmax logit [H] or None).

        cache_BSC: this layer's latent cache [B, max_seq, kv_lora_rank + dr]; the new tokens' latents
        are written at their positions, then attention runs over slots [0, ctx.kv_len).
        """
        B, T, _ = x_BTD.shape
        if cache_BSC is None and ctx.absorbed and ctx.mask_B1TL is None and x_BTD.device.type == "cpu":
            return self._absorbed_folded(x_BTD, ctx)
        q_nope, q_pe = self.query(x_BTD, ctx)
        latent = self.latent(x_BTD, ctx)
        if cache_BSC is not None:
            rows = torch.arange(B, device=x_BTD.device)[:, None]
            cache_BSC[rows, ctx.positions_BT] = latent.to(cache_BSC.dtype)
            latent = cache_BSC[:, : ctx.kv_len]
        mask = ctx.mask_B1TL
        if ctx.absorbed:
            out = self._absorbed(q_nope, q_pe, latent.to(q_nope.dtype), mask)
        else:
            out = self._naive(q_nope, q_pe, latent.to(q_nope.dtype), mask)
        max_logit = None
        if ctx.record_max_logit:
            max_logit = self._max_logit(q_nope, q_pe, latent.to(q_nope.dtype), mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim)), max_logit

    def query_latent_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_UK^T W_Q^nope per head [H, C, in]: the nope query projection mapped into latent space (in
        `dtype`, default the weights'), so that q_lat . c_kv is the nope logit."""
        H, dn = self.n_heads, self.nope_dim
        w_q = (self.q_proj if self.q_lora_rank is None else self.q_b_proj).weight.view(H, dn + self.rope_dim, -1)
        w_uk, _ = self.w_uk_uv()
        dtype = dtype or w_q.dtype
        return torch.einsum("hdc,hdi->hci", w_uk.to(dtype), w_q[:, :dn].to(dtype))

    def output_latent_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_O W_UV per head [D, H, C]: the output projection reading the latent attention output."""
        _, w_uv = self.w_uk_uv()
        w_o = self.o_proj.weight.view(-1, self.n_heads, self.v_dim)
        dtype = dtype or w_o.dtype
        return torch.einsum("ehd,hdc->ehc", w_o.to(dtype), w_uv.to(dtype))

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The absorbed form's per-head maps folded into the projections around attention, in fp32:
        W_q [H, C + dr, in] = [W_UK^T W_Q^nope | W_Q^rope] per head, times the softmax scale (RoPE is
        linear, so scaling the rope rows before rotating is the same), and W_o [D, H, C] = W_O W_UV per
        head. Then one GEMM gives the scaled query [q_lat | q_pe] of every head and one GEMM maps the
        latent attention output to D: no per-head einsums (and their layout copies) in training."""
        H, dn, dr = self.n_heads, self.nope_dim, self.rope_dim
        w_q = (self.q_proj if self.q_lora_rank is None else self.q_b_proj).weight.view(H, dn + dr, -1)
        with torch.autocast(w_q.device.type, enabled=False):  # one rounding, by the GEMM's own cast
            w_q = torch.cat((self.query_latent_weight(), w_q[:, dn:]), dim=1) * self.scale
            w_o = self.output_latent_weight()
        return w_q, w_o

    def _absorbed_folded(self, x_BTD: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal self-attention without a cache in the absorbed form, with `folded_weights` (CPU: the
        per-head einsums and their copies were ~30% of a bf16 attention layer's fwd + bwd on `small`,
        LOG 2026-12-02 trainspeed). Same maths as forward's absorbed path up to rounding."""
        B, T, _ = x_BTD.shape
        H, C, dr = self.n_heads, self.kv_lora_rank, self.rope_dim
        w_q, w_o = self.folded_weights()
        src = x_BTD if self.q_lora_rank is None else self.q_latent(x_BTD)
        q = F.linear(src, w_q.reshape(H * (C + dr), -1)).view(B, T, H, C + dr)
        q_lat, q_pe = q.split([C, dr], dim=-1)
        q = torch.cat((q_lat, apply_rope(q_pe, ctx.cos_BTR, ctx.sin_BTR, self.interleaved).to(q.dtype)), dim=-1)
        latent = self.latent(x_BTD, ctx).to(q.dtype)
        o_lat = causal_attention_blocked(q, latent[:, :, None], latent[:, :, None, :C], 1.0)
        out = F.linear(o_lat.reshape(B, T, H * C), w_o.reshape(w_o.shape[0], H * C), self.o_proj.bias)
        max_logit = None
        if ctx.record_max_logit:  # from the scaled query: divide the scale back out
            max_logit = self._max_logit_lat(q_lat / self.scale, q[..., C:] / self.scale, latent, None)
        return out, max_logit

    def _naive(self, q_nope, q_pe, latent_BLC, mask_B1TL) -> torch.Tensor:
        k, v = self.expand_kv(latent_BLC)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if mask_B1TL is None and q.device.type == "cpu":
            return causal_attention_blocked(q, k, v, self.scale)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask_B1TL, is_causal=mask_B1TL is None, scale=self.scale,
        )
        return o.transpose(1, 2)  # [B,T,H,dv]

    def _absorbed(self, q_nope, q_pe, latent_BLC, mask_B1TL) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        L = latent_BLC.shape[1]
        w_uk, w_uv = self.w_uk_uv()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        if mask_B1TL is None and q_lat.device.type == "cpu":
            C = self.kv_lora_rank
            o_lat = causal_attention_blocked(torch.cat((q_lat, q_pe), dim=-1), latent_BLC[:, :, None],
                                             latent_BLC[:, :, None, :C], self.scale)
            return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)
        # all T*H queries attend one shared latent "head": a single [T*H, L] score matrix per sequence
        q = torch.cat((q_lat, q_pe), dim=-1).reshape(B, 1, T * H, -1)
        if mask_B1TL is None:
            pos = torch.arange(T, device=q.device)
            mask = (torch.arange(L, device=q.device)[None, :] <= pos[:, None] + (L - T))
            mask = mask.repeat_interleave(H, dim=0)  # [T*H, L]
        else:
            mask = mask_B1TL.repeat_interleave(H, dim=2)  # [B,1,T*H,L]
        o_lat = F.scaled_dot_product_attention(
            q, latent_BLC[:, None], latent_BLC[:, None, :, : self.kv_lora_rank], attn_mask=mask, scale=self.scale
        ).view(B, T, H, self.kv_lora_rank)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)

    @torch.no_grad()
    def _max_logit(self, q_nope, q_pe, latent_BLC, mask_B1TL) -> torch.Tensor:
        """max over batch and (query, key) pairs of the scaled logit q.k, per head [H] (for QK-clip)."""
        w_uk, _ = self.w_uk_uv()
        return self._max_logit_lat(torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_pe, latent_BLC, mask_B1TL)

    @torch.no_grad()
    def _max_logit_lat(self, q_lat, q_pe, latent_BLC, mask_B1TL) -> torch.Tensor:
        B, T, H, _ = q_lat.shape
        L = latent_BLC.shape[1]
        c_kv, k_pe = latent_BLC.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        s = torch.einsum("bthc,blc->bhtl", q_lat, c_kv) + torch.einsum("bthr,blr->bhtl", q_pe, k_pe)
        if mask_B1TL is None:
            mask = torch.ones(T, L, dtype=torch.bool, device=s.device).tril(L - T)
        else:
            mask = mask_B1TL
        s = s.float().masked_fill(~mask, float("-inf")) * self.scale
        return s.amax(dim=(0, 2, 3))


def causal_attention_blocked(q_BTHd: torch.Tensor, k_BTGd: torch.Tensor, v_BTGe: torch.Tensor, scale: float,
                             block: int | None = None) -> torch.Tensor:
    """Exact causal softmax self-attention over T tokens -> [B, T, H, e], for CPU.

    k/v have G = H heads (MHA, MLA's naive form) or G = 1 (one key/value shared by all heads: MLA's
    absorbed form, where every head attends the same latent; the H query rows of a token then go into
    one matmul with the shared keys, which is much better shaped than H small ones).
    PyTorch's CPU SDPA takes its unfused "math" path when the value head dim differs from the key's,
    which scores every (query, key) pair and masks half of them afterwards. Here queries go in blocks
    of `block` tokens and block i scores only keys [0, end of block i): about half the score work at
    long T (0.75 of it at T = 256). Scores and probabilities are in the matmul dtype. Default block:
    64 tokens with shared k/v (their H rows per token already make tall matmuls), 128 per-head (both
    measured best for the `small` preset at T = 256, docs/LOG.md). On CPUs without bf16 matmul
    instructions, bf16/fp16 compute in fp32 (CPU_NATIVE_BF16).
    """
    dev = q_BTHd.device.type
    if dev == "cpu" and not CPU_NATIVE_BF16 and (
            torch.is_autocast_enabled("cpu") or q_BTHd.dtype in (torch.bfloat16, torch.float16)):
        # without native bf16 matmuls, CPU bmm in bf16 is 5-8x slower than in fp32 at these shapes
        # (small, T = 256, fwd + bwd: 2.7 s vs 0.5 s; docs/LOG.md): attention runs in fp32, its output
        # in the input's dtype
        with torch.autocast("cpu", enabled=False):
            out_dtype = q_BTHd.dtype
            o = causal_attention_blocked(q_BTHd.float(), k_BTGd.float(), v_BTGe.float(), scale, block)
        return o if torch.is_autocast_enabled("cpu") else o.to(out_dtype)
    B, T, H, d = q_BTHd.shape
    G, e = k_BTGd.shape[2], v_BTGe.shape[-1]
    if scale != 1.0:
        q_BTHd = q_BTHd * scale
    if torch.is_autocast_enabled(dev):  # cast once here, not in every block's matmul
        dt = torch.get_autocast_dtype(dev)
        q_BTHd, k_BTGd, v_BTGe = q_BTHd.to(dt), k_BTGd.to(dt), v_BTGe.to(dt)
    if G == 1:  # rows (token, head), token-major; keys shared: [B, T, d]
        q = q_BTHd.reshape(B, T * H, d)
        k, v = k_BTGd.reshape(B, T, d), v_BTGe.reshape(B, T, e)
        rows = H
    elif G == H:  # one problem per (batch, head)
        q = q_BTHd.transpose(1, 2).reshape(B * H, T, d)
        k, v = k_BTGd.transpose(1, 2).reshape(B * H, T, d), v_BTGe.transpose(1, 2).reshape(B * H, T, e)
        rows = 1
    else:
        raise ValueError(f"k/v must have 1 or {H} heads, got {G}")
    if block is None:
        block = 64 if G == 1 else 128
    n_blocks = max(1, -(-T // block))
    size = -(-T // n_blocks)
    outs = []
    # split, not sliced: the blocks' query gradients are concatenated once in backward instead of each
    # block's slice gradient being scattered into a zero-filled full-size tensor and summed
    for s0, q_blk in zip(range(0, T, size), q.split(size * rows, dim=1)):
        s1 = min(s0 + size, T)
        scores = torch.bmm(q_blk, k[:, :s1].transpose(1, 2))  # [., (s1 - s0) * rows, s1]
        hidden = torch.ones(s1 - s0, s1, dtype=torch.bool, device=q.device).triu(s0 + 1)
        if rows > 1:
            hidden = hidden.repeat_interleave(rows, dim=0)
        # in place (bmm's backward does not need its output); CPU softmax accumulates reduced-precision
        # inputs in fp32 and rounds once at the output
        probs = scores.masked_fill_(hidden, float("-inf")).softmax(-1)
        outs.append(torch.bmm(probs.to(v.dtype), v[:, :s1]))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if G == 1:
        return o.view(B, T, H, e)
    return o.view(B, H, T, e).transpose(1, 2)
