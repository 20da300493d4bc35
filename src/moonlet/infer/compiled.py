"""Batch-1 decode as one compiled graph (torch.compile / inductor), projections as fused reductions.

Why: a batch-1 decode step of `small` is ~100 matrix-vector products of 0.2-4 MB and a few hundred
small ops. Eagerly, each product is a BLAS call, and how fast that is depends on the CPU: on the AMD
Zen 5 VM MKL's sgemv reads a weight at 14-18 GB/s whether it sits in DRAM or L3 (a plain `sum` over
the same tensor reads 46 GB/s), oneDNN's bf16 one is no faster (LOG 2026-12-02). Written as
`(w * x).sum(-1)`, inductor emits vectorized loops that read fp32, bf16 or int8 weights at their own
width (int8: the dequantization is fused, no bf16 copy), and the norms, RoPE, routing and residual
adds around them fuse into the same few kernels; the step runs as one call instead of ~560.

What is in the graph: everything `FastForward.__call__` does for one token at batch 1 -- embedding,
every layer (absorbed MLA over the latent cache with the fast path's folded W_UK / W_UV, the token's
k routed experts gathered by index from the stacked weights, shared experts, dense MLPs), final norm
and lm_head -- with the cache length as the one dynamic dimension (one compile serves every
length). Reductions accumulate in fp32; the cache keeps its dtype. Batches > 1, speculative verify
steps, prefill and INT4 weights stay on the fast path.

Guards: a call passes only the token, its position and the cache views; everything else is fixed per
instance, so dynamo's guards on it (~150 weight tensors and the structure around them: 0.29 ms of a
2.5 ms step, measured) are dropped, `__call__` checks what they would have (one token, length >= 2,
the cache's dtype) and each instance compiles its own copy of the step's code object, because dynamo
keeps one cache per code object and without guards two engines would otherwise share a graph.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LayerCache
from ..model.moe import MoE
from ..model.quant import QuantWeight
from . import fastpath as fp

Weight = tuple[torch.Tensor, torch.Tensor | None]  # (weight [N, K] or stack [E, N, K], int8 scale or None)


def supports(ff: fp.FastForward) -> bool:
    """Float or INT8 weights (INT4 has no fused reduction here: it stays on the fast path)."""
    return all(not isinstance(w, QuantWeight) or w.scheme == "int8" for w in ff.model.modules())


def _weight(p) -> Weight:
    """(weight, scale) of a fast-path projection."""
    if isinstance(p, fp._Int8Proj):
        return p.q, p.s
    return p.w, None


def _stack(*ws) -> Weight:
    """Expert stacks [E, N, K] concatenated along N (gate and up read the same input)."""
    if isinstance(ws[0], QuantWeight):
        return torch.cat([w.qweight for w in ws], 1), torch.cat([w.scale for w in ws], 1)
    return torch.cat([w.detach() for w in ws], 1), None


def matvec(x_K: torch.Tensor, w: Weight) -> torch.Tensor:
    """w @ x in fp32, as the multiply + sum that inductor turns into one vectorized reduction."""
    w_NK, s_N = w
    y_N = (w_NK.float() * x_K.float()).sum(-1)
    return y_N if s_N is None else y_N * s_N.float()


def expert_matvec(x_K: torch.Tensor, w: Weight, idx_k: torch.Tensor) -> torch.Tensor:
    """Each chosen expert's weight times x ([K], shared, or [k, K], one row per expert): [k, N]. The
    gather by index stays inside the reduction's loads (no copy of the experts' weights)."""
    w_ENK, s_EN = w
    x = x_K.float()[:, None, :] if x_K.dim() == 2 else x_K.float()
    y_kN = (w_ENK[idx_k].float() * x).sum(-1)
    return y_kN if s_EN is None else y_kN * s_EN[idx_k].float()


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()


def _rope(x_HR: torch.Tensor, cos_R: torch.Tensor, sin_R: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """apply_rope's rotation in real arithmetic (inductor does not generate code for complex ops)."""
    if interleaved:
        x0, x1 = x_HR.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos_R - x1 * sin_R, x1 * cos_R + x0 * sin_R), -1).flatten(-2)
    half = x_HR.shape[-1] // 2
    x0, x1 = x_HR[..., :half], x_HR[..., half:]
    return torch.cat((x0 * cos_R - x1 * sin_R, x1 * cos_R + x0 * sin_R), -1)


@dataclass
class _Layer:
    attn: fp._Attn
    norm_in: torch.nn.Module
    norm_post: torch.nn.Module
    qkv_a: Weight | None  # q_a + kv_a stacked (q LoRA configs)
    q: Weight
    kv_a: Weight | None  # plain-q configs
    o: Weight
    mlp: Weight | None = None  # dense: gate + up
    down: Weight | None = None
    router: torch.nn.Module | None = None
    experts_gate_up: Weight | None = None
    experts_down: Weight | None = None
    shared: Weight | None = None
    shared_down: Weight | None = None


def _global_guards_only(entries) -> list[bool]:
    """Keep dynamo's guards on global state (grad mode, default device, ...), drop those on inputs and
    on the instance (see the module docstring)."""
    return [e.name == "" for e in entries]


class CompiledDecode:
    """One decode step of one sequence through a compiled graph: (token, position, cache) -> (logits,
    hidden), as FastForward.__call__ with B = T = 1 (tests compare both)."""

    def __init__(self, ff: fp.FastForward):
        self.ff = ff
        self.model = ff.model
        self.refresh()

    def refresh(self) -> None:
        """Re-derive the weights from the fast path's (call after ff.refresh()); the next call compiles
        anew (the graph was built for the old weights' dtypes and shapes, with no guards to notice)."""
        if not supports(self.ff):
            raise ValueError("the compiled decode step covers float and INT8 weights (not INT4)")
        code = CompiledDecode._step.__code__
        own = types.FunctionType(code.replace(co_name=f"_step_{id(self):x}_{id(object()):x}"), globals(), code.co_name)
        self._fn = torch.compile(types.MethodType(own, self), dynamic=False,
                                 options={"guard_filter_fn": _global_guards_only})
        self._cache_dtype: torch.dtype | None = None
        ff = self.ff
        self.layers = []
        for i, layer in enumerate(self.model.model.layers):
            a = ff.attn[i]
            kind, mod, w = ff.mlp[i]
            L = _Layer(a, layer.input_layernorm, layer.post_attention_layernorm,
                       qkv_a=None if a.qkv_a is None else _weight(a.qkv_a), q=_weight(a.q),
                       kv_a=None if a.qkv_a is not None else _weight(a.kv_a), o=_weight(a.o))
            if a.qkv_a is None and a.q_a is not None:
                raise ValueError("q LoRA with q_a and kv_a stored differently is not compiled")
            if kind == "dense":
                L.mlp, L.down = _weight(w[0]), _weight(w[1])
            else:
                moe: MoE = mod[0]
                ex = moe.experts
                L.router = moe.gate
                L.experts_gate_up = _stack(ex.gate_proj, ex.up_proj)
                L.experts_down = _stack(ex.down_proj)
                if w is not None:
                    L.shared, L.shared_down = _weight(w[0]), _weight(w[1])
            self.layers.append(L)
        self.head = _weight(ff.lm_head)

    def _step(self, ids_1: torch.Tensor, pos_11: torch.Tensor, latents: list[torch.Tensor]):
        m = self.model
        x = F.embedding(ids_1, m.model.embed_tokens.weight)[0].float()  # [D]
        cos, sin = m.model.rotary(pos_11, torch.float32)
        cos, sin = cos.view(-1), sin.view(-1)
        for L, lat_1SC in zip(self.layers, latents):
            mla = L.attn.m
            H, C, dr = mla.n_heads, mla.kv_lora_rank, mla.rope_dim
            h = _rms(x, L.norm_in)
            if L.qkv_a is not None:
                both = matvec(h, L.qkv_a)
                Qr = mla.q_lora_rank
                cq, kv = _rms(both[:Qr], L.attn.q_norm.norm), both[Qr:]
            else:
                cq, kv = h, matvec(h, L.kv_a)
            q = matvec(cq, L.q)
            split = q.shape[0] - H * dr
            q_pe = _rope(q[split:].view(H, dr), cos, sin, mla.interleaved)
            qn = q[:split].view(H, -1)
            if not L.attn.fold_q:
                qn = torch.einsum("hd,hdc->hc", qn, L.attn.w_uk.float())
            k_pe = _rope(kv[C:], cos, sin, mla.interleaved)
            lat_1SC[0, -1] = torch.cat((_rms(kv[:C], L.attn.kv_norm.norm), k_pe)).to(lat_1SC.dtype)
            lat = lat_1SC[0].float()  # [S, C + dr], S = the position + 1 (dynamic)
            p = (torch.mm(torch.cat((qn, q_pe), -1), lat.t()) * mla.scale).softmax(-1)  # [H, S]
            o = torch.mm(p, lat[:, :C])  # [H, C]
            if not L.attn.fold_o:
                o = torch.einsum("hc,hcv->hv", o, L.attn.w_uv.float())
            x = x + matvec(o.reshape(-1), L.o)
            h = _rms(x, L.norm_post)
            if L.router is None:
                g, u = matvec(h, L.mlp).chunk(2)
                x = x + matvec(F.silu(g) * u, L.down)
                continue
            r = L.router(h[None])  # fp32 in, as Router.forward computes
            idx_k, w_k = r.indices_NK[0], r.weights_NK[0].float()
            g, u = expert_matvec(h, L.experts_gate_up, idx_k).chunk(2, -1)
            x = x + (expert_matvec(F.silu(g) * u, L.experts_down, idx_k) * w_k[:, None]).sum(0)
            if L.shared is not None:
                g, u = matvec(h, L.shared).chunk(2)
                x = x + matvec(F.silu(g) * u, L.shared_down)
        hidden = _rms(x, m.model.norm)
        return matvec(hidden, self.head), hidden

    def __call__(self, ids_11: torch.Tensor, positions_11: torch.Tensor, cache: list[LayerCache]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [1, 1, V] float32, final-normed hidden [1, 1, D] in the model's dtype)."""
        if ids_11.shape != (1, 1) or positions_11.shape != (1, 1):
            raise ValueError(f"the compiled step decodes one token of one sequence, got ids {tuple(ids_11.shape)}")
        kv_len = int(positions_11) + 1
        if kv_len < 2:
            raise ValueError("the compiled step needs a prompt in the cache (position >= 1)")
        dev = self.model.model.embed_tokens.weight.device
        latents = [c.latent[:, :kv_len] for c in cache[:len(self.layers)]]
        if self._cache_dtype is None:
            self._cache_dtype = latents[0].dtype  # the graph is compiled for it
        if latents[0].dtype != self._cache_dtype or latents[0].shape[0] != 1:
            raise ValueError(f"compiled for one sequence's {self._cache_dtype} cache, got {tuple(latents[0].shape)} "
                             f"{latents[0].dtype}")
        for lat in latents:
            torch._dynamo.mark_dynamic(lat, 1)
        logits, hidden = self._fn(ids_11.reshape(1).to(dev), positions_11.to(dev), latents)
        dtype = self.model.model.embed_tokens.weight.dtype
        return logits.view(1, 1, -1), hidden.to(dtype).view(1, 1, -1)
