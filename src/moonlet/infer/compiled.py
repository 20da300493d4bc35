"""Decode steps as one compiled graph (torch.compile / inductor), projections as fused reductions.

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
length). Batches of B >= 2 rows (each at its own position; attention masked past it) run a second
graph with B dynamic too. Reductions accumulate in fp32; the cache keeps its dtype. Multi-token
(speculative verify) steps, prefill and INT4 weights stay on the fast path.

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
    if p.bias is not None:
        raise ValueError("the compiled decode step has no projection biases (DeepSeek-V3 / Kimi-K2 have none)")
    if isinstance(p, fp._Int8Proj):
        return p.q, p.s
    return p.w, None


def _experts(w) -> Weight:
    """An expert stack [E, N, K] as (weight, scale): the module's own tensors, no copy."""
    if isinstance(w, QuantWeight):
        return w.qweight, w.scale
    return w.detach(), None


def matvec(x_BK: torch.Tensor, w: Weight) -> torch.Tensor:
    """x @ w^T in fp32 for a few rows, as the multiply + sum that inductor turns into one vectorized
    reduction per output."""
    w_NK, s_N = w
    y_BN = (w_NK.float()[None] * x_BK.float()[:, None, :]).sum(-1)
    return y_BN if s_N is None else y_BN * s_N.float()


def expert_matvec(x: torch.Tensor, w: Weight, idx_Bk: torch.Tensor) -> torch.Tensor:
    """Each row's chosen experts times its x ([B, K], shared by its experts, or [B, k, K], one per
    expert): [B, k, N]. The gather by index stays inside the reduction's loads (no copy of weights)."""
    w_ENK, s_EN = w
    x_BkK = x.float()[:, None, None, :] if x.dim() == 2 else x.float()[:, :, None, :]
    y_BkN = (w_ENK[idx_Bk].float() * x_BkK).sum(-1)
    return y_BkN if s_EN is None else y_BkN * s_EN[idx_Bk].float()


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
    experts_gate: Weight | None = None
    experts_up: Weight | None = None
    experts_down: Weight | None = None
    shared: Weight | None = None
    shared_down: Weight | None = None


def _global_guards_only(entries) -> list[bool]:
    """Keep dynamo's guards on global state (grad mode, default device, ...), drop those on inputs and
    on the instance (see the module docstring)."""
    return [e.name == "" for e in entries]


class CompiledDecode:
    """A decode step of B sequences, one token each at its own position, through a compiled graph (one
    for B = 1, one for any B >= 2): (tokens, positions, cache rows) -> (logits, hidden), as
    FastForward.__call__ with T = 1 (tests compare both)."""

    def __init__(self, ff: fp.FastForward):
        self.ff = ff
        self.model = ff.model
        self.refresh()

    def _compile(self, B: int):
        """The step for one row (B = 1) or for any number >= 2 (B = 2: the batch size is dynamic), compiled
        from its own copy of the code object (see the module docstring: there are no guards to tell
        instances or the two graphs apart)."""
        code = CompiledDecode._step.__code__
        own = types.FunctionType(code.replace(co_name=f"_step_{id(self):x}_{len(self._fns)}_b{B}"), globals(),
                                 code.co_name)
        return torch.compile(types.MethodType(own, self), dynamic=False,
                             options={"guard_filter_fn": _global_guards_only})

    def refresh(self) -> None:
        """Re-derive the weights from the fast path's (call after ff.refresh()); the next calls compile
        anew (the graphs were built for the old weights' dtypes and shapes, with no guards to notice)."""
        if not supports(self.ff):
            raise ValueError("the compiled decode step covers float and INT8 weights (not INT4)")
        self._fns: dict[int, object] = {}
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
                L.experts_gate, L.experts_up, L.experts_down = (_experts(w) for w in
                                                                (ex.gate_proj, ex.up_proj, ex.down_proj))
                if w is not None:
                    L.shared, L.shared_down = _weight(w[0]), _weight(w[1])
            self.layers.append(L)
        self.head = _weight(ff.lm_head)

    def _step(self, ids_B: torch.Tensor, pos_B: torch.Tensor, latents: list[torch.Tensor]):
        m = self.model
        B = ids_B.shape[0]
        x = F.embedding(ids_B, m.model.embed_tokens.weight).float()  # [B, D]
        cos, sin = m.model.rotary(pos_B[:, None], torch.float32)
        cos, sin = cos[:, 0, None], sin[:, 0, None]  # [B, 1, R/2]: broadcast over heads
        rows = torch.arange(B, device=ids_B.device)
        for L, lat_BSC in zip(self.layers, latents):
            mla = L.attn.m
            H, C, dr = mla.n_heads, mla.kv_lora_rank, mla.rope_dim
            h = _rms(x, L.norm_in)
            if L.qkv_a is not None:
                both = matvec(h, L.qkv_a)
                Qr = mla.q_lora_rank
                cq, kv = _rms(both[:, :Qr], L.attn.q_norm.norm), both[:, Qr:]
            else:
                cq, kv = h, matvec(h, L.kv_a)
            q = matvec(cq, L.q)
            split = q.shape[1] - H * dr
            q_pe = _rope(q[:, split:].view(B, H, dr), cos, sin, mla.interleaved)
            qn = q[:, :split].view(B, H, -1)
            if not L.attn.fold_q:
                qn = torch.einsum("bhd,hdc->bhc", qn, L.attn.w_uk.float())
            k_pe = _rope(kv[:, None, C:], cos, sin, mla.interleaved)[:, 0]
            new = torch.cat((_rms(kv[:, :C], L.attn.kv_norm.norm), k_pe), -1)
            lat_BSC.index_put_((rows, pos_B), new.to(lat_BSC.dtype))
            lat = lat_BSC.float()  # [B, S, C + dr], S = the furthest row's position + 1 (dynamic)
            scores = torch.bmm(torch.cat((qn, q_pe), -1), lat.transpose(1, 2)) * mla.scale  # [B, H, S]
            if B > 1:  # rows behind the furthest one do not see the slots after their own position
                beyond = torch.arange(lat.shape[1], device=lat.device)[None, None, :] > pos_B[:, None, None]
                scores = scores.masked_fill(beyond, float("-inf"))
            o = torch.bmm(scores.softmax(-1), lat[:, :, :C])  # [B, H, C]
            if not L.attn.fold_o:
                o = torch.einsum("bhc,hcv->bhv", o, L.attn.w_uv.float())
            x = x + matvec(o.reshape(B, -1), L.o)
            h = _rms(x, L.norm_post)
            if L.router is None:
                g, u = matvec(h, L.mlp).chunk(2, -1)
                x = x + matvec(F.silu(g) * u, L.down)
                continue
            r = L.router(h)  # fp32 in, as Router.forward computes
            idx_Bk, w_Bk = r.indices_NK, r.weights_NK.float()
            g, u = expert_matvec(h, L.experts_gate, idx_Bk), expert_matvec(h, L.experts_up, idx_Bk)
            x = x + (expert_matvec(F.silu(g) * u, L.experts_down, idx_Bk) * w_Bk[..., None]).sum(1)
            if L.shared is not None:
                g, u = matvec(h, L.shared).chunk(2, -1)
                x = x + matvec(F.silu(g) * u, L.shared_down)
        hidden = _rms(x, m.model.norm)
        return matvec(hidden, self.head), hidden

    def __call__(self, ids_B1: torch.Tensor, positions_B1: torch.Tensor, cache: list[LayerCache]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row at its own position -> (logits [B, 1, V] float32, final-normed hidden [B, 1, D]
        in the model's dtype)."""
        B = ids_B1.shape[0]
        if ids_B1.shape != (B, 1) or positions_B1.shape != (B, 1):
            raise ValueError(f"the compiled step decodes one token per row, got ids {tuple(ids_B1.shape)}")
        pos_B = positions_B1[:, 0]
        kv_len = int(pos_B.max()) + 1
        if kv_len < 2:
            raise ValueError("the compiled step needs a prompt in the cache (position >= 1)")
        dev = self.model.model.embed_tokens.weight.device
        latents = [c.latent[:, :kv_len] for c in cache[:len(self.layers)]]
        if self._cache_dtype is None:
            self._cache_dtype = latents[0].dtype  # the graphs are compiled for it
        if latents[0].dtype != self._cache_dtype or latents[0].shape[0] != B:
            raise ValueError(f"compiled for a {self._cache_dtype} cache of the batch's rows, got "
                             f"{tuple(latents[0].shape)} {latents[0].dtype}")
        ids_B, pos_B = ids_B1[:, 0].to(dev), pos_B.to(dev)
        for lat in latents:
            torch._dynamo.mark_dynamic(lat, 1)
        if B > 1:  # one graph for every batch of >= 2 rows
            for t in (ids_B, pos_B, *latents):
                torch._dynamo.mark_dynamic(t, 0)
        fn = self._fns.get(min(B, 2))
        if fn is None:
            fn = self._fns[min(B, 2)] = self._compile(min(B, 2))
        logits, hidden = fn(ids_B, pos_B, latents)
        dtype = self.model.model.embed_tokens.weight.dtype
        return logits.view(B, 1, -1), hidden.to(dtype).view(B, 1, -1)
