"""Decode steps as one compiled graph (torch.compile / inductor), projections as fused reductions.

Why: a batch-1 decode step of `small` is ~100 matrix-vector products of 0.2-4 MB and a few hundred
small ops. Eagerly, each product is a BLAS call, and how fast that is depends on the CPU: on the AMD
Zen 5 VM MKL's sgemv reads a weight at 14-18 GB/s whether it sits in DRAM or L3 (a plain `sum` over
the same tensor reads 46 GB/s), oneDNN's bf16 one is no faster (LOG 2026-12-02). Written as
`(w * x).sum(-1)`, inductor emits vectorized loops that read fp32, bf16 or int8 weights at their own
width (int8: the dequantization is fused, no bf16 copy), and the norms, RoPE, routing and residual
adds around them fuse into the same few kernels; the step runs as one call instead of ~560.

What is in the graph: everything `FastForward.__call__` does for T tokens per row -- embedding,
every layer (absorbed MLA over the latent cache with the fast path's folded W_UK / W_UV, masked past
each query's position, each token's k routed experts gathered by index from the stacked weights,
shared experts, dense MLPs), final norm and lm_head -- with the cache length dynamic (one compile
serves every length). Graphs are keyed by T (1 for decoding, k + 1 for a speculative verify) and by
batch: one for a single row, one for any B >= 2 (B dynamic too). MTP depth 1 (speculative drafting)
is a graph of its own, and a greedy speculative round with one draft (verify, acceptance, MTP, next
draft) is one graph too. Reductions accumulate in fp32; the cache keeps its dtype. Prefill (an empty
cache) and INT4 weights stay on the fast path.

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
from ..model.rope import apply_rope
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


def matvec(x_BK: torch.Tensor, w: Weight, static_rows: bool = False) -> torch.Tensor:
    """x @ w^T in fp32 for a few rows, as the multiply + sum that inductor turns into one vectorized
    reduction per output. static_rows: the row count is a compile-time constant (one sequence)."""
    w_NK, s_N = w
    if static_rows and 1 < x_BK.shape[0] <= 4:
        # a speculative verify of one sequence: one reduction per row over the same weight, which
        # inductor fuses into one loop reading each weight row once; written as one [B, N, K]
        # reduction it parallelizes over rows and reads the weight once per row (demo-trained
        # `small`, fused round 5.9 -> 5.2 ms; LOG 2026-12-02)
        y_BN = torch.stack([(w_NK.float() * x_BK[r].float()).sum(-1) for r in range(x_BK.shape[0])])
    else:
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
    """Decode / verify steps of B sequences, T tokens each at their own positions, through compiled
    graphs: (tokens, positions, cache rows) -> (logits, hidden), as FastForward.__call__ with
    last_only=False (tests compare both); `mtp` as FastForward.mtp."""

    def __init__(self, ff: fp.FastForward):
        self.ff = ff
        self.model = ff.model
        self.refresh()

    def _compile(self, name: str):
        """A graph from its own copy of the code object of method `name` (see the module docstring: there
        are no guards to tell instances or graphs apart)."""
        code = getattr(CompiledDecode, name).__code__
        own = types.FunctionType(code.replace(co_name=f"{name}_{id(self):x}_{len(self._fns)}"), globals(),
                                 code.co_name)
        return torch.compile(types.MethodType(own, self), dynamic=False,
                             options={"guard_filter_fn": _global_guards_only})

    def refresh(self) -> None:
        """Re-derive the weights from the fast path's (call after ff.refresh()); the next calls compile
        anew (the graphs were built for the old weights' dtypes and shapes, with no guards to notice)."""
        if not supports(self.ff):
            raise ValueError("the compiled decode step covers float and INT8 weights (not INT4)")
        self._fns: dict[tuple, object] = {}
        self._cache_dtype: torch.dtype | None = None
        ff = self.ff
        m = self.model
        blocks = list(m.model.layers) + list(m.mtp)  # as FastForward: MTP depths are blocks too
        self.layers = [self._layer(i, layer) for i, layer in enumerate(blocks)]
        self.n_main = len(m.model.layers)
        self.head = _weight(ff.lm_head)
        self.eh_proj = [_weight(p) for p in ff.eh_proj]

    def _layer(self, i: int, layer) -> _Layer:
        ff = self.ff
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
        return L

    def _block(self, L: _Layer, x: torch.Tensor, pos_BT: torch.Tensor, lat_BSC: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decoder block over N = B*T rows x [N, D] (fp32) at positions pos_BT, writing their latents."""
        B, T = pos_BT.shape
        N = B * T
        one = B == 1  # B is a compile-time 1 in the one-row graphs (dynamic, >= 2, in the others)
        mla = L.attn.m
        H, C, dr = mla.n_heads, mla.kv_lora_rank, mla.rope_dim
        h = _rms(x, L.norm_in)
        if L.qkv_a is not None:
            both = matvec(h, L.qkv_a, one)
            Qr = mla.q_lora_rank
            cq, kv = _rms(both[:, :Qr], L.attn.q_norm.norm), both[:, Qr:]
        else:
            cq, kv = h, matvec(h, L.kv_a, one)
        q = matvec(cq, L.q, one)
        split = q.shape[1] - H * dr
        q_pe = apply_rope(q[:, split:].view(N, H, dr), cos, sin, mla.interleaved)
        qn = q[:, :split].view(N, H, -1)
        if not L.attn.fold_q:
            qn = torch.einsum("nhd,hdc->nhc", qn, L.attn.w_uk.float())
        k_pe = apply_rope(kv[:, None, C:], cos, sin, mla.interleaved)[:, 0]
        new = torch.cat((_rms(kv[:, :C], L.attn.kv_norm.norm), k_pe), -1)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        lat_BSC.index_put_((rows.reshape(-1), pos_BT.reshape(-1)), new.to(lat_BSC.dtype))
        lat = lat_BSC.float()  # [B, S, C + dr], S = the furthest position + 1 (dynamic)
        qa = torch.cat((qn, q_pe), -1).view(B, T * H, C + dr)
        scores = torch.bmm(qa, lat.transpose(1, 2)) * mla.scale  # [B, T*H, S]
        if B > 1 or T > 1:  # a query does not see the slots past its own position
            pos_BTH = pos_BT[:, :, None].expand(B, T, H).reshape(B, T * H)
            scores = scores.masked_fill(torch.arange(lat.shape[1], device=x.device) > pos_BTH[:, :, None],
                                        float("-inf"))
        o = torch.bmm(scores.softmax(-1), lat[:, :, :C]).view(N, H, C)
        if not L.attn.fold_o:
            o = torch.einsum("nhc,hcv->nhv", o, L.attn.w_uv.float())
        x = x + matvec(o.reshape(N, -1), L.o, one)
        h = _rms(x, L.norm_post)
        if L.router is None:
            g, u = matvec(h, L.mlp, one).chunk(2, -1)
            return x + matvec(F.silu(g) * u, L.down, one)
        r = L.router(h)  # fp32 in, as Router.forward computes
        idx_Nk, w_Nk = r.indices_NK, r.weights_NK.float()
        g, u = expert_matvec(h, L.experts_gate, idx_Nk), expert_matvec(h, L.experts_up, idx_Nk)
        x = x + (expert_matvec(F.silu(g) * u, L.experts_down, idx_Nk) * w_Nk[..., None]).sum(1)
        if L.shared is not None:
            g, u = matvec(h, L.shared, one).chunk(2, -1)
            x = x + matvec(F.silu(g) * u, L.shared_down, one)
        return x

    def _rotation(self, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.model.rotary(pos_BT, torch.float32)  # [B, T, R/2]
        return cos.reshape(-1, 1, cos.shape[-1]), sin.reshape(-1, 1, sin.shape[-1])  # [N, 1, R/2]: over heads

    def _step(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, latents: list[torch.Tensor]):
        m = self.model
        x = F.embedding(ids_BT.reshape(-1), m.model.embed_tokens.weight).float()  # [N, D]
        cos, sin = self._rotation(pos_BT)
        for L, lat in zip(self.layers[:self.n_main], latents):
            x = self._block(L, x, pos_BT, lat, cos, sin)
        hidden = _rms(x, m.model.norm)
        return matvec(hidden, self.head, ids_BT.shape[0] == 1), hidden

    def _mtp(self, h_ND: torch.Tensor, next_ids_BT: torch.Tensor, pos_BT: torch.Tensor, lat: torch.Tensor):
        m = self.model
        mod = m.mtp[0]
        emb = F.embedding(next_ids_BT.reshape(-1), m.model.embed_tokens.weight).float()
        x = matvec(torch.cat((_rms(emb, mod.enorm), _rms(h_ND.float(), mod.hnorm)), -1), self.eh_proj[0],
                   pos_BT.shape[0] == 1)
        cos, sin = self._rotation(pos_BT)
        x = self._block(self.layers[self.n_main], x, pos_BT, lat, cos, sin)
        return _rms(x, mod.shared_head.norm)

    def _greedy_round(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, latents: list[torch.Tensor],
                      lat_mtp: torch.Tensor):
        """A whole greedy speculative round with one draft: verify [pending, draft], the accepted count,
        MTP over both positions and the next draft. MTP at position j reads the token after j, which is
        the target's argmax there whether the draft was accepted (then it equals the draft) or not (then
        it is the correction); the slot written for a rejected draft is rewritten before it is read."""
        B, T = ids_BT.shape
        logits, hidden = self._step(ids_BT, pos_BT, latents)
        target_BT = logits.view(B, T, -1).argmax(-1)
        accepted_B = (ids_BT[:, 1] == target_BT[:, 0]).long()
        h = self._mtp(hidden, target_BT, pos_BT, lat_mtp).view(B, T, -1)
        h_BD = torch.where(accepted_B[:, None] > 0, h[:, 1], h[:, 0])
        return target_BT, accepted_B, matvec(h_BD, self.head).argmax(-1)

    def _inputs(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, lats: list[torch.Tensor]):
        """Checked, on the model's device, the cache length marked dynamic (and the batch, B >= 2)."""
        B, T = ids_BT.shape
        if positions_BT.shape != (B, T):
            raise ValueError(f"positions {tuple(positions_BT.shape)} do not match ids {tuple(ids_BT.shape)}")
        kv_len = int(positions_BT.max()) + 1
        if int(positions_BT.min()) < 1:
            raise ValueError("the compiled step needs a prompt in the cache (positions >= 1)")
        dev = self.model.model.embed_tokens.weight.device
        lats = [lat[:, :kv_len] for lat in lats]
        if self._cache_dtype is None:
            self._cache_dtype = lats[0].dtype  # the graphs are compiled for it
        if lats[0].dtype != self._cache_dtype or lats[0].shape[0] != B:
            raise ValueError(f"compiled for a {self._cache_dtype} cache of the batch's rows, got "
                             f"{tuple(lats[0].shape)} {lats[0].dtype}")
        ids_BT, positions_BT = ids_BT.to(dev), positions_BT.to(dev)
        for lat in lats:
            torch._dynamo.mark_dynamic(lat, 1)
        if B > 1:  # one graph for every batch of >= 2 rows
            for t in (ids_BT, positions_BT, *lats):
                torch._dynamo.mark_dynamic(t, 0)
        return ids_BT, positions_BT, lats

    def _run(self, name: str, B: int, T: int, *args):
        key = (name, min(B, 2), T)
        fn = self._fns.get(key)
        if fn is not None:
            return fn(*args)
        fn = self._compile(name)
        try:  # the first call compiles (inductor needs a C++ compiler on CPU, Triton on GPU)
            out = fn(*args)
        except Exception as e:
            raise RuntimeError(f"compiling the decode graph failed ({type(e).__name__}: {str(e)[:300]}); "
                               "run without compile (--compile)") from e
        self._fns[key] = fn
        return out

    def __call__(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, cache: list[LayerCache]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """T tokens per row at their positions -> (logits [B, T, V] float32, final-normed hidden [B, T, D]
        in the model's dtype)."""
        B, T = ids_BT.shape
        ids, pos, lats = self._inputs(ids_BT, positions_BT, [c.latent for c in cache[:self.n_main]])
        logits, hidden = self._run("_step", B, T, ids, pos, lats)
        dtype = self.model.model.embed_tokens.weight.dtype
        return logits.view(B, T, -1), hidden.to(dtype).view(B, T, -1)

    def greedy_round(self, ids_B2: torch.Tensor, positions_B2: torch.Tensor, cache: list[LayerCache]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy speculative decoding with one MTP draft, a round as one graph call: [pending, draft] at
        their positions -> (the target's argmax at both [B, 2], accepted drafts per row [B] (0 or 1), the
        next draft [B]), the main and MTP caches written. Why one call: as three (verify, MTP, draft
        head) the calls' own overhead cost the demo's `tiny` k = 1 0.71x; as one, 0.83-0.98x (LOG)."""
        if not self.model.mtp:
            raise ValueError("this model has no MTP module")
        B, T = ids_B2.shape
        if T != 2:
            raise ValueError(f"a fused round verifies one draft: ids must be [B, 2], got {tuple(ids_B2.shape)}")
        ids, pos, lats = self._inputs(ids_B2, positions_B2, [c.latent for c in cache[:self.n_main + 1]])
        return self._run("_greedy_round", B, T, ids, pos, lats[:-1], lats[-1])

    def mtp(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
            cache: list[LayerCache]) -> torch.Tensor:
        """MTP depth 1 as FastForward.mtp (not fresh): its normed hidden [B, T, D] in the model's dtype."""
        if not self.model.mtp:
            raise ValueError("this model has no MTP module")
        B, T, D = h_BTD.shape
        ids, pos, (lat,) = self._inputs(next_ids_BT, positions_BT, [cache[self.n_main].latent])
        h = h_BTD.reshape(B * T, D).to(ids.device)
        if B > 1:
            torch._dynamo.mark_dynamic(h, 0)
        out = self._run("_mtp", B, T, h, ids, pos, lat)
        return out.to(h_BTD.dtype).view(B, T, D)
