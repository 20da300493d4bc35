"""An inference-only forward of the same modules, for plain MLA + MoE configs (no DSA / mHC / Engram).

What it changes against `CausalLM.forward` (all exact up to float rounding; tests compare both):
- absorbed MLA with the absorption folded into the weights once: W_UK into q_b_proj (the query
  comes out directly in latent space) and W_UV into o_proj, unless that costs over twice the
  multiply-adds of applying them per token (folded for `tiny`/`small`, not for DeepSeek-V3's sizes);
- RoPE as one complex multiply with the rotation built once per forward, RMSNorm as one fused call;
- decode attention as one baddbmm (scores + additive mask) -> softmax -> bmm over the latent cache,
  with the mask built once per forward instead of per layer, in fp32 on CPU whatever the cache dtype;
- a fresh prefill (empty cache row) attends causally without a mask through the model's blocked
  CPU attention, in the form measured faster (absorbed / naive, `prefill_form`);
- MoE up to 1024 (token, expert) pairs runs only the chosen experts, one plain matmul chain each on
  views of the stacked weights (CPU grouped_mm visits every expert); beyond, grouped_mm;
- gate and up projections of dense MLPs and shared experts fused into one matmul;
- on CPUs without native bf16 matmuls, bf16 products of >= 64 rows (prefill) run in fp32;
- weight-only quantized weights (moonlet.model.quant) through their kernels.
Weights derived here are copies: call `refresh()` after changing the model's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import CausalLM, LayerCache
from ..model.attention import MLA, causal_attention_blocked
from ..model.moe import MLP, MoE
from ..model.quant import QuantWeight, cat_rows, linear
from ..model.rope import apply_rope


def supports(cfg: ModelConfig) -> bool:
    return not cfg.is_dsa and cfg.hc_mult is None and cfg.engram_layers is None


# CPUs without native bf16 matmuls (AVX2 only, like this project's CI machine) run bf16 GEMMs ~6x
# slower than fp32 from ~64 rows (512 x 512 x 1536: 55 vs 8.7 ms); below that bf16's halved weight
# bytes win (1 row: 2.4x faster). So bf16 products with >= 64 rows run in fp32 there (LOG 2026-12-02).
UPCAST_ROWS = 0 if torch.cpu._is_avx512_bf16_supported() else 64


def _upcast(x: torch.Tensor) -> bool:
    return (UPCAST_ROWS > 0 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() >= UPCAST_ROWS * x.shape[-1])


def _linear(x: torch.Tensor, w, e: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w[e]^T (+ bias) for a plain or quantized weight (stack), in fp32 where bf16 is slow (_upcast)."""
    if _upcast(x):
        if not isinstance(w, QuantWeight):
            w, e = (w if e is None else w[e]).float(), None
        y = linear(x.float(), w, e)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    y = linear(x, w, e)
    return y if bias is None else y + bias.to(y.dtype)


def _apply(mod, x: torch.Tensor) -> torch.Tensor:
    """A Linear-like module (nn.Linear or QuantLinear) through _linear."""
    return _linear(x, mod if isinstance(mod, QuantWeight) else mod.weight, bias=mod.bias)


class _Attn:
    """Derived weights of one MLA layer."""

    def __init__(self, attn: MLA):
        self.m = attn
        H, dn, dr, dv, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
        w_uk, w_uv = attn.w_uk_uv()  # [H, dn, C], [H, dv, C]
        q_w = attn.q_proj.weight if attn.q_lora_rank is None else attn.q_b_proj.weight  # [H*(dn+dr), Q]
        q_mod = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
        Q = q_w.shape[1]
        q_w = q_w.view(H, dn + dr, Q)
        # fold W_UK into the query projection unless that costs over 2x the multiply-adds of applying
        # it per token (Q*C vs Q*dn + dn*C per head): at these sizes one matmul less beats a few FLOPs
        self.fold_q = Q * C <= 2 * (Q * dn + dn * C) and not isinstance(q_mod, QuantWeight)
        if isinstance(q_mod, QuantWeight):  # quantized: the same row reordering, on the int rows (exact)
            rows = torch.arange(H * (dn + dr)).view(H, dn + dr)
            self.q_weight = q_mod.select_rows(torch.cat((rows[:, :dn].reshape(-1), rows[:, dn:].reshape(-1))))
            self.w_uk = w_uk.contiguous()
        elif self.fold_q:
            q_lat = torch.einsum("hdc,hdq->hcq", w_uk.float(), q_w[:, :dn].float()).to(q_w.dtype)
            self.q_weight = torch.cat((q_lat.reshape(H * C, Q), q_w[:, dn:].reshape(H * dr, Q))).contiguous()
        else:
            self.q_weight = torch.cat((q_w[:, :dn].reshape(H * dn, Q), q_w[:, dn:].reshape(H * dr, Q))).contiguous()
            self.w_uk = w_uk.contiguous()  # [H, dn, C]
        quant_o = isinstance(attn.o_proj, QuantWeight)
        o_w = attn.o_proj if quant_o else attn.o_proj.weight  # [D, H*dv]
        D = o_w.shape[0]
        self.fold_o = D * C <= 2 * (D * dv + dv * C) and not quant_o  # the same rule for W_UV into o_proj
        if self.fold_o:
            self.o_weight = torch.einsum("ehv,hvc->ehc", o_w.view(D, H, dv).float(), w_uv.float()
                                         ).reshape(D, H * C).to(o_w.dtype).contiguous()
        else:
            self.w_uv = w_uv.transpose(1, 2).contiguous()  # [H, C, dv]
            self.o_weight = o_w
        self.o_bias = attn.o_proj.bias


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in one call (fp32: the module's own math; other dtypes: the module, which normalizes in fp32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def _rope(x: torch.Tensor, rot: torch.Tensor | None, cos, sin, interleaved: bool) -> torch.Tensor:
    """RoPE of x [..., R] with the complex rotation rot (interleaved pairs), else the model's apply_rope."""
    if rot is None or not interleaved:
        return apply_rope(x, cos, sin, interleaved)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def _fused_mlp(mlp: MLP) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mlp.gate_proj, QuantWeight):
        return cat_rows(mlp.gate_proj, mlp.up_proj), mlp.down_proj
    return torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).contiguous(), mlp.down_proj.weight


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g, u = _linear(x, gate_up).chunk(2, dim=-1)
    return _linear(F.silu(g) * u, down)


class FastForward:
    # up to this many (token, expert) pairs the per-expert loop beats CPU grouped_mm, which visits
    # every expert (small MoE layer: 2.0 vs 13 ms at 1 token, 64 vs 166 at 32, equal at 512; LOG)
    loop_max_pairs = 1024
    prefill_form = "absorbed"

    def __init__(self, model: CausalLM):
        if not supports(model.config):
            raise ValueError("the fast inference path covers plain MLA + MoE configs (no DSA, mHC or Engram)")
        self.model = model
        self.cfg = model.config
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        m = self.model
        blocks = list(m.model.layers) + list(m.mtp)  # MTP depths are blocks too (speculative drafting)
        self.attn = [_Attn(layer.self_attn) for layer in blocks]
        self.mlp = []
        for layer in blocks:
            if isinstance(layer.mlp, MoE):
                shared = None if layer.mlp.shared_experts is None else _fused_mlp(layer.mlp.shared_experts)
                self.mlp.append(("moe", layer.mlp, shared))
            else:
                self.mlp.append(("dense", layer.mlp, _fused_mlp(layer.mlp)))

    # ---- pieces ---------------------------------------------------------------------------------
    def _moe(self, moe: MoE, shared, x_ND: torch.Tensor) -> torch.Tensor:
        r = moe.gate(x_ND)
        N, K = r.indices_NK.shape
        if N * K > self.loop_max_pairs and not _upcast(x_ND):
            y = moe.experts(x_ND, r.indices_NK, r.weights_NK)
        else:
            ex = moe.experts
            flat = r.indices_NK.reshape(-1)
            w = r.weights_NK.reshape(-1, 1).to(x_ND.dtype)
            if N == 1:
                y = None
                for k, e in enumerate(flat.tolist()):
                    h = F.silu(_linear(x_ND, ex.gate_proj, e)) * _linear(x_ND, ex.up_proj, e)
                    o = _linear(h, ex.down_proj, e) * w[k]
                    y = o if y is None else y + o
            else:
                order = flat.argsort()
                token = order // K
                xs = x_ND.index_select(0, token)
                counts = torch.bincount(flat, minlength=ex.n_experts).tolist()
                outs, start = [], 0
                for e, n in enumerate(counts):
                    if n:
                        xe = xs[start:start + n]
                        outs.append(_linear(F.silu(_linear(xe, ex.gate_proj, e)) * _linear(xe, ex.up_proj, e),
                                            ex.down_proj, e))
                        start += n
                ys = torch.cat(outs) * w.index_select(0, order)
                y = torch.zeros_like(x_ND).index_add_(0, token, ys)
        if shared is not None:
            y = y + _swiglu(x_ND, *shared)
        return y

    def _attention(self, a: _Attn, x_BTD: torch.Tensor, cos, sin, rot, positions_BT, latent_cache: torch.Tensor,
                   mask_add: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        m = a.m
        B, T, _ = x_BTD.shape
        H, C, dr = m.n_heads, m.kv_lora_rank, m.rope_dim
        cq = x_BTD if m.q_lora_rank is None else _norm(m.q_a_layernorm, _apply(m.q_a_proj, x_BTD))
        q = _linear(cq, a.q_weight)
        qn = q[..., : q.shape[-1] - H * dr].view(B, T, H, -1)
        q_pe = _rope(q[..., q.shape[-1] - H * dr:].view(B, T, H, dr), None if rot is None else rot[:, :, None],
                     cos, sin, m.interleaved)
        if not a.fold_q:
            qn = torch.einsum("bthd,hdc->bthc", qn, a.w_uk)
        c_kv, k_pe = _apply(m.kv_a_proj_with_mqa, x_BTD).split([C, dr], dim=-1)
        latent = torch.cat((_norm(m.kv_a_layernorm, c_kv), _rope(k_pe, rot, cos, sin, m.interleaved)), dim=-1)
        if mask_add is None:  # fresh prefill at positions 0..T-1
            latent_cache[:, :T] = latent
            lat = latent
        else:
            latent_cache[torch.arange(B, device=positions_BT.device)[:, None], positions_BT] = latent
            lat = latent_cache[:, :kv_len]
        qa = torch.cat((qn, q_pe), dim=-1)  # [B,T,H,C+dr]
        if mask_add is None:
            if self.prefill_form == "absorbed":
                o = causal_attention_blocked(qa, lat[:, :, None], lat[:, :, None, :C], m.scale)  # [B,T,H,C]
            else:
                return self._naive_prefill(a, x_BTD, cos, sin, lat)
        else:
            qa, lat = qa.to(mask_add.dtype), lat.to(mask_add.dtype)  # bf16 cache -> fp32 on CPU (_context)
            scores = torch.baddbmm(mask_add, qa.view(B, T * H, C + dr), lat.transpose(1, 2), alpha=m.scale)
            o = torch.bmm(scores.softmax(-1), lat[:, :, :C]).view(B, T, H, C).to(x_BTD.dtype)
        if a.fold_o:
            return _linear(o.reshape(B, T, H * C), a.o_weight, bias=a.o_bias)
        return _linear(torch.einsum("bthc,hcv->bthv", o, a.w_uv).reshape(B, T, -1), a.o_weight, bias=a.o_bias)

    def _naive_prefill(self, a: _Attn, x_BTD, cos, sin, lat) -> torch.Tensor:
        m = a.m
        B, T, _ = x_BTD.shape
        q_nope, q_pe = m.query(x_BTD, _Ctx(cos, sin))
        k, v = m.expand_kv(lat)
        o = causal_attention_blocked(torch.cat((q_nope, q_pe), dim=-1), k, v, m.scale)
        return m.o_proj(o.reshape(B, T, -1))

    # ---- forward --------------------------------------------------------------------------------
    def _context(self, positions_BT: torch.Tensor, x: torch.Tensor, fresh: bool):
        """What every layer of one forward shares: RoPE tables and the additive decode mask."""
        dtype, dev = x.dtype, x.device
        positions_BT = positions_BT.to(dev)
        cos, sin = self.model.model.rotary(positions_BT, dtype)
        rot = torch.complex(cos.float(), sin.float()) if self.cfg.rope_interleave else None
        B, T = positions_BT.shape
        mask_add, kv_len = None, T
        if not fresh:
            kv_len = int(positions_BT.max()) + 1
            visible = torch.arange(kv_len, device=dev)[None, None, :] <= positions_BT[:, :, None]  # [B,T,L]
            H = self.cfg.num_attention_heads
            # decode attention's dtype: CPU bmm in bf16 is 3-4x slower than casting the latent cache to
            # fp32 and running it there (T = 1: 53 vs 19 us at 40 keys, 2.6 vs 0.6 ms at 2048; LOG)
            att_dtype = torch.float32 if dev.type == "cpu" else dtype
            mask_add = torch.zeros(B, T, H, kv_len, dtype=att_dtype, device=dev).masked_fill_(~visible[:, :, None], float("-inf"))
            mask_add = mask_add.view(B, T * H, kv_len)
        return cos, sin, rot, positions_BT, mask_add, kv_len

    def _block(self, i: int, layer, x: torch.Tensor, ctx, latent_cache: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin, rot, positions_BT, mask_add, kv_len = ctx
        h = _norm(layer.input_layernorm, x)
        x = x + self._attention(self.attn[i], h, cos, sin, rot, positions_BT, latent_cache, mask_add, kv_len)
        h = _norm(layer.post_attention_layernorm, x)
        kind, mod, w = self.mlp[i]
        if kind == "dense":
            return x + _swiglu(h, *w)
        return x + self._moe(mod, w, h.view(B * T, -1)).view(B, T, -1)

    def __call__(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, cache: list[LayerCache],
                 last_only: bool = True, fresh: bool = False, last_index_B: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [B, T or 1, V], final-normed hidden [B, T, D]). fresh: the rows' caches are empty
        and positions are 0..T-1 (a prefill: causal attention without a mask; right-padded rows are
        fine, a real token never sees the padding after it). last_index_B: logits at these positions."""
        m = self.model
        x = m.model.embed_tokens(ids_BT)
        ctx = self._context(positions_BT, x, fresh)
        for i, layer in enumerate(m.model.layers):
            x = self._block(i, layer, x, ctx, cache[i].latent)
        hidden = _norm(m.model.norm, x)
        if last_index_B is not None:
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index_B.to(hidden.device)][:, None]
        else:
            h = hidden[:, -1:] if last_only else hidden
        return _apply(m.lm_head, h), hidden

    def mtp(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
            cache: list[LayerCache], fresh: bool = False) -> torch.Tensor:
        """MTP depth 1 (as MTPModule.forward) over (h_i, Emb(t_{i+1})) at the given positions -> its
        normed hidden [B,T,D]; cache: all layers' caches (the depth's is the one after the main layers)."""
        m = self.model
        L = self.cfg.num_hidden_layers
        mod = m.mtp[0]
        emb = m.model.embed_tokens(next_ids_BT)
        x = _apply(mod.eh_proj, torch.cat((_norm(mod.enorm, emb), _norm(mod.hnorm, h_BTD)), dim=-1))
        x = self._block(L, mod, x, self._context(positions_BT, x, fresh), cache[L].latent)
        return _norm(mod.shared_head.norm, x)


class _Ctx:
    """The two fields of AttnContext that MLA.latent / MLA.query read."""

    def __init__(self, cos, sin):
        self.cos_BTR, self.sin_BTR = cos, sin
