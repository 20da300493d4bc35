"""An inference-only forward of the same modules, for plain MLA + MoE configs (no DSA / mHC / Engram).

What it changes against `CausalLM.forward` (all exact up to float rounding; tests compare both):
- absorbed MLA with the absorption folded into the weights once: W_UK into q_b_proj (the query
  comes out directly in latent space) and W_UV into o_proj, unless that costs over twice the
  multiply-adds of applying them per token (folded for `tiny`/`small`, not for DeepSeek-V3's sizes);
- activations as [tokens, dim] and every projection one `mm` against a transposed view made once
  (`F.linear` on [B, T, D] dispatches four ops), residual adds fused into the output projections
  (addmm), q_a and kv_a as one matmul, RMSNorm as one fused kernel for a few rows: a CPU decode step
  is ~100 matrix-vector products plus hundreds of small ops of a few us each (1,201 ops per `small`
  step before, ~560 after; LOG 2026-12-02);
- products of a few rows as W @ x^T where this CPU runs that form faster (SKINNY_ROWS);
- decode: RoPE as one small bmm with per-token rotation matrices built once per forward (the model's
  own apply_rope applied to the identity), attention as one baddbmm -> softmax -> bmm over the latent
  cache in fp32 on CPU whatever the cache dtype, no mask when every row attends its whole prefix;
- a fresh prefill (empty cache row) attends causally without a mask through the model's blocked
  CPU attention, in the form measured faster (absorbed / naive, `prefill_form`);
- MoE: up to 4 tokens route in Python over their E scores (3 ops instead of ~25) and each runs its
  own experts on per-expert weight views, the down projection accumulating into the shared expert's
  output (addmm); up to 1024 (token, expert) pairs run only the chosen experts, sorted by expert;
  beyond, grouped_mm;
- gate and up projections of dense MLPs and shared experts fused into one matmul;
- on CPUs without native bf16 matmuls, bf16 products of >= 64 rows (prefill) run in fp32;
- weight-only quantized weights (moonlet.model.quant) through their kernels.
Weights derived here are copies or views: call `refresh()` after changing the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import CausalLM, LayerCache
from ..model.attention import MLA, causal_attention_blocked
from ..model import moe as moe_mod
from ..model.cpu import CPU_NATIVE_BF16
from ..model.moe import MLP, MoE, Router
from ..model.quant import QuantWeight, cat_rows, int8_kernel_mm, linear
from ..model.rope import apply_rope


def supports(cfg: ModelConfig) -> bool:
    return not cfg.is_dsa and cfg.hc_mult is None and cfg.engram_layers is None


# CPUs without native bf16 matmuls (AVX2 only, like one of the VMs this project ran on) run bf16 GEMMs ~6x
# slower than fp32 from ~64 rows (512 x 512 x 1536: 55 vs 8.7 ms); below that bf16's halved weight
# bytes win (1 row: 2.4x faster). So bf16 products with >= 64 rows run in fp32 there (LOG 2026-12-02).
UPCAST_ROWS = 0 if CPU_NATIVE_BF16 else 64


def _upcast(x: torch.Tensor) -> bool:
    # the row count first: a decode step asks ~700 times and should stop at the cheapest test
    return (UPCAST_ROWS > 0 and x.numel() >= UPCAST_ROWS * x.shape[-1] and x.dtype == torch.bfloat16
            and x.device.type == "cpu")


# A few activation rows on CPU: which of W @ x^T and x @ W^T is faster depends on the BLAS path, which
# here follows the ISA (measured on two VMs, LOG 2026-12-02). AVX2-only: fp32 W @ x^T for 2..32 rows
# (MKL: small's lm_head at 8 rows 6.4 -> 2.9 ms, 384 x 512 at 2 rows 193 -> 95 us; equal near 96 rows,
# slower above). With bf16 matmul instructions (AMX VM): bf16 W @ x^T for 2..64 rows (oneDNN: 8 rows of
# 1536 x 512 131 -> 89 us, lm_head 598 -> 395 us) while fp32 W @ x^T is the slower form (small, batch 8
# step 27.3 vs 19.7 ms, 1 thread). One row is a matrix-vector product either way.
SKINNY_ROWS = {torch.float32: 0, torch.bfloat16: 64} if CPU_NATIVE_BF16 else {torch.float32: 32, torch.bfloat16: 0}


def _skinny(x_NK: torch.Tensor) -> bool:
    return 2 <= x_NK.shape[0] <= SKINNY_ROWS.get(x_NK.dtype, 0) and x_NK.device.type == "cpu"


def _linear(x: torch.Tensor, w, e: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w[e]^T (+ bias) for a plain or quantized weight (stack), in fp32 where bf16 is slow (_upcast)."""
    if _upcast(x):
        if not isinstance(w, QuantWeight):
            w, e = (w if e is None else w[e]).float(), None
        y = linear(x.float(), w, e)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    y = linear(x, w, e)
    return y if bias is None else y + bias.to(y.dtype)


class _Proj:
    """One projection for activations x [N, K]: a single mm against w.t() (a view made once), the
    quantized weight's kernel, or fp32 products where bf16 is slow (_upcast)."""

    def __init__(self, w, bias: torch.Tensor | None = None):
        self.w, self.bias = w, bias
        self.wt = None if isinstance(w, QuantWeight) else w.t()

    def __call__(self, x_NK: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias), plus acc when given (a residual: one addmm instead of mm + add)."""
        if self.wt is None or _upcast(x_NK):
            y = _linear(x_NK, self.w, bias=self.bias)
            return y if acc is None else acc + y
        if _skinny(x_NK):
            y = torch.mm(self.w, x_NK.t()).t()
            if self.bias is not None:
                y = y + self.bias
            return y.contiguous() if acc is None else acc + y
        if acc is not None:
            y = torch.addmm(acc, x_NK, self.wt)
            return y if self.bias is None else y.add_(self.bias)
        if self.bias is None:
            return torch.mm(x_NK, self.wt)
        return torch.addmm(self.bias, x_NK, self.wt)


class _Int8Proj:
    """An INT8 weight-only projection (of a weight, or of expert e of a stack) calling torch's fused
    kernel directly for a few rows (bf16 activations inside, as QuantWeight.linear does): the ints and
    bf16 scales are picked once, so a call is cast -> kernel -> cast (a batch-1 `small` step makes ~100
    of them; QuantWeight.linear's per-call selection and reshapes cost more than the kernel)."""

    wt = None  # not a float weight: no fused-row tricks (q_a + kv_a go through cat_rows instead)

    def __init__(self, w: QuantWeight, e: int | None = None, bias: torch.Tensor | None = None):
        self.w, self.e, self.bias = w, e, bias
        self.q, self.s = (w.qweight, w.scale) if e is None else (w.qweight[e], w.scale[e])

    def __call__(self, x_NK: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        if x_NK.shape[0] > self.w.kernel_max_rows or x_NK.device.type != "cpu":
            y = _linear(x_NK, self.w, self.e, self.bias)
        else:
            y = int8_kernel_mm(x_NK, self.q, self.s)
            if self.bias is not None:
                y = y + self.bias
        return y if acc is None else acc + y


def _proj(w, bias: torch.Tensor | None = None) -> "_Proj | _Int8Proj":
    """The projection object for a float weight or a quantized one."""
    if isinstance(w, QuantWeight) and w.scheme == "int8" and w.qweight.dim() == 2:
        return _Int8Proj(w, bias=bias)
    return _Proj(w, bias)


def _proj_of(mod) -> "_Proj | _Int8Proj":
    """From an nn.Linear or a QuantLinear."""
    return _proj(mod if isinstance(mod, QuantWeight) else mod.weight, mod.bias)


def _stacked_proj(*mods) -> "_Proj | _Int8Proj | None":
    """One projection over the output rows of Linears / QuantLinears that read the same input (one
    matmul instead of several; exact), or None where they cannot be stacked (a bias, or different
    storage)."""
    if any(m.bias is not None for m in mods):
        return None
    if not any(isinstance(m, QuantWeight) for m in mods):
        return _Proj(torch.cat([m.weight for m in mods]).contiguous())
    if all(isinstance(m, QuantWeight) for m in mods) and len({(m.scheme, m.group_size) for m in mods}) == 1:
        return _proj(cat_rows(*mods))
    return None


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
            q_weight = q_mod.select_rows(torch.cat((rows[:, :dn].reshape(-1), rows[:, dn:].reshape(-1))))
            self.w_uk = w_uk.contiguous()
        elif self.fold_q:
            q_lat = attn.query_latent_weight(torch.float32).to(q_w.dtype)
            q_weight = torch.cat((q_lat.reshape(H * C, Q), q_w[:, dn:].reshape(H * dr, Q))).contiguous()
        else:
            q_weight = torch.cat((q_w[:, :dn].reshape(H * dn, Q), q_w[:, dn:].reshape(H * dr, Q))).contiguous()
            self.w_uk = w_uk.contiguous()  # [H, dn, C]
        self.q = _proj(q_weight)  # -> [N, H*C (folded) or H*dn | H*dr]
        self.q_a = None if attn.q_lora_rank is None else _proj_of(attn.q_a_proj)
        self.q_norm = None if attn.q_lora_rank is None else _Norm(attn.q_a_layernorm)
        self.kv_a = _proj_of(attn.kv_a_proj_with_mqa)
        self.kv_norm = _Norm(attn.kv_a_layernorm)
        # q_a_proj and kv_a_proj_with_mqa read the same input: one matmul
        self.qkv_a = None if attn.q_lora_rank is None else _stacked_proj(attn.q_a_proj, attn.kv_a_proj_with_mqa)
        quant_o = isinstance(attn.o_proj, QuantWeight)
        o_w = attn.o_proj if quant_o else attn.o_proj.weight  # [D, H*dv]
        D = o_w.shape[0]
        self.fold_o = D * C <= 2 * (D * dv + dv * C) and not quant_o  # the same rule for W_UV into o_proj
        if self.fold_o:
            o_w = attn.output_latent_weight(torch.float32).reshape(D, H * C).to(o_w.dtype).contiguous()
        else:
            self.w_uv = w_uv.transpose(1, 2).contiguous()  # [H, C, dv]
        self.o = _proj(o_w, attn.o_proj.bias)


class _Experts:
    """Routed experts of one MoE layer: a _Proj per expert weight (views of the stacks), an _Int8Proj per
    INT8 expert weight, or (other quantized forms) the QuantExperts stacks through their kernels."""

    def __init__(self, experts):
        self.mod = experts
        stacks = (experts.gate_proj, experts.up_proj, experts.down_proj)
        self.projs = None  # None: through the QuantExperts stacks (int4)
        if not isinstance(experts.gate_proj, QuantWeight):
            self.projs = [tuple(_Proj(w) for w in ws) for ws in zip(*(t.unbind(0) for t in stacks))]
        elif all(w.scheme == "int8" for w in stacks):
            self.projs = [tuple(_Int8Proj(w, e) for w in stacks) for e in range(experts.gate_proj.qweight.shape[0])]

    def hidden(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """silu(x W_gate[e]^T) * (x W_up[e]^T)."""
        if self.projs is None:
            ex = self.mod
            return F.silu(_linear(x, ex.gate_proj, e)) * _linear(x, ex.up_proj, e)
        gate, up, _ = self.projs[e]
        return F.silu(gate(x)) * up(x)

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        if self.projs is None:
            return _linear(h, self.mod.down_proj, e)
        return self.projs[e][2](h)

    def down_add(self, acc: torch.Tensor, h: torch.Tensor, e: int, weight: float) -> torch.Tensor:
        """acc + weight * (h W_down[e]^T) for one token, one addmm where it can be."""
        wt = None if self.projs is None else self.projs[e][2].wt
        if wt is None or _upcast(h):
            return acc + self.down(h, e) * weight
        return torch.addmm(acc, h, wt, alpha=weight)


class _Route:
    """The router of a few tokens in Python over their E scores: Router.forward's rule (tests compare
    both); a batch-1 step then costs 3 tensor ops per layer instead of ~25."""

    def __init__(self, gate: Router):
        self.gate = gate
        self.w_t = gate.weight.detach().float().t()  # [D, E] (the router runs in fp32)
        bias = gate.e_score_correction_bias
        self.bias = None if bias is None else bias.tolist()

    def __call__(self, x_ND: torch.Tensor) -> list[list[tuple[int, float]]]:
        """Per token: [(expert, gate weight)] of its top-k."""
        logits = torch.mm(x_ND.float(), self.w_t)
        scores = logits.sigmoid() if self.gate.scoring_func == "sigmoid" else logits.softmax(-1)
        return [self._one(row) for row in scores.tolist()]

    def _one(self, scores: list[float]) -> list[tuple[int, float]]:
        g = self.gate
        E, G = g.n_experts, g.n_group
        size = E // G
        if g.topk_method == "noaux_tc":
            choice = [s + b for s, b in zip(scores, self.bias)]
            group_score = [sum(sorted(choice[i * size:(i + 1) * size])[-2:]) for i in range(G)]
        else:
            choice = scores
            group_score = [max(scores[i * size:(i + 1) * size]) for i in range(G)]
        if G > 1 and g.topk_method != "greedy":
            groups = sorted(range(G), key=group_score.__getitem__, reverse=True)[:g.topk_group]
            candidates = [e for i in groups for e in range(i * size, (i + 1) * size)]
        else:
            candidates = range(E)
        chosen = sorted(candidates, key=choice.__getitem__, reverse=True)[:g.top_k]
        weights = [scores[e] for e in chosen]
        if g.norm_topk_prob and g.top_k > 1:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        return [(e, w * g.scaling) for e, w in zip(chosen, weights)]


class _Norm:
    """RMSNorm. For a few rows on CPU as LayerNorm of [x, -x] (mean 0, variance mean(x^2): the same
    x / rms(x)), because torch's CPU rms_norm is a composite of 6-8 small ops and layer_norm one fused
    kernel: per [1, 512] call 19 -> 15 us in fp32 (bit-identical here), 69 -> 29 us in bf16 (rounds once
    instead of twice). Over a prefill's rows the doubled copy costs more than the ops it saves (512 rows:
    ~1.4 ms vs 0.5), so there and off CPU: fp32 rms_norm, or the module's math (normalize in fp32, cast
    back, scale)."""

    max_rows = 64

    def __init__(self, norm):
        self.norm = norm
        w = norm.weight.detach()
        self.w2 = torch.cat((w, torch.zeros_like(w)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        if x.device.type != "cpu" or x.numel() > self.max_rows * D:
            if x.dtype == torch.float32:
                return F.rms_norm(x, (D,), self.norm.weight, self.norm.eps)
            return self.norm(x)
        y = F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * D,), self.w2, None, self.norm.eps)
        return y[..., :D]


def _rope(x: torch.Tensor, rot: torch.Tensor | None, cos, sin, interleaved: bool) -> torch.Tensor:
    """RoPE of x [..., R] with the complex rotation rot (interleaved pairs), else the model's apply_rope."""
    if rot is None or not interleaved:
        return apply_rope(x, cos, sin, interleaved)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def _fused_mlp(mlp: MLP) -> tuple[_Proj, _Proj]:
    return _stacked_proj(mlp.gate_proj, mlp.up_proj), _proj_of(mlp.down_proj)


def _swiglu(x: torch.Tensor, gate_up: _Proj, down: _Proj, acc: torch.Tensor | None = None) -> torch.Tensor:
    g, u = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(g) * u, acc)


@dataclass
class _Step:
    """What every layer of one forward shares."""

    B: int
    T: int
    fresh: bool  # empty cache rows, positions 0..T-1: causal attention without a mask
    positions_BT: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rot: torch.Tensor | None = None  # prefill: complex rotation (interleaved RoPE)
    rope_NRR: torch.Tensor | None = None  # decode: x_roped = x @ rope_NRR[n] per token, fp32
    att_dtype: torch.dtype = torch.float32
    mask_add: torch.Tensor | None = None  # decode: additive mask [B, T*H, kv_len], None = all visible
    kv_len: int = 0
    start: int | None = None  # decode: every row writes slots [start, start + T)
    rows_B1: torch.Tensor | None = None  # decode otherwise: row index for the cache write
    zero: torch.Tensor | None = None


class FastForward:
    # up to this many (token, expert) pairs the per-expert loop beats CPU grouped_mm, which visits
    # every expert (small MoE layer: 2.0 vs 13 ms at 1 token, 64 vs 166 at 32, equal at 512; LOG)
    loop_max_pairs = 1024
    # where GEMMs JIT a kernel per row count (bf16 on CPU, oneDNN), a loop's ever-new expert group sizes
    # each compile one (~1.4 ms): beyond decode sizes, the grouped GEMM with its rows padded to a few
    # sizes (512-token bf16 prefill with new routing per call, 1 thread: 267 -> 241 ms median)
    jit_loop_max_pairs = 64
    # up to this many tokens, each runs its own k experts (routing in Python, ~12 ops per token)
    # instead of the sorted dispatch (~45 ops + 6 per expert hit); the same weight bytes unless two
    # tokens share an expert
    per_token_max_rows = 4
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
                self.mlp.append(("moe", (layer.mlp, _Route(layer.mlp.gate), _Experts(layer.mlp.experts)), shared))
            else:
                self.mlp.append(("dense", layer.mlp, _fused_mlp(layer.mlp)))
        self.norms = [(_Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)) for layer in blocks]
        self.final_norm = _Norm(m.model.norm)
        self.mtp_norms = [(_Norm(mod.enorm), _Norm(mod.hnorm), _Norm(mod.shared_head.norm)) for mod in m.mtp]
        self.lm_head = _proj_of(m.lm_head)
        self.eh_proj = [_proj_of(mod.eh_proj) for mod in m.mtp]

    # ---- MoE ------------------------------------------------------------------------------------
    def _moe(self, parts, shared, x_ND: torch.Tensor, resid_ND: torch.Tensor) -> torch.Tensor:
        """resid + MoE(x)."""
        moe, route, ex = parts
        N = x_ND.shape[0]
        if N <= self.per_token_max_rows:  # a decode step or a short verify: each token its own experts
            y = resid_ND if shared is None else _swiglu(x_ND, *shared, acc=resid_ND)
            rows = []
            for n, chosen in enumerate(route(x_ND)):
                x_n, y_n = (x_ND, y) if N == 1 else (x_ND[n:n + 1], y[n:n + 1])
                for e, w in chosen:
                    y_n = ex.down_add(y_n, ex.hidden(x_n, e), e, w)
                rows.append(y_n)
            return rows[0] if N == 1 else torch.cat(rows)
        r = moe.gate(x_ND)
        K = r.indices_NK.shape[1]
        grouped = N * K > (self.jit_loop_max_pairs if moe_mod.jit_per_shape(x_ND.device, x_ND.dtype)
                           else self.loop_max_pairs)
        if grouped and not _upcast(x_ND):
            y = moe.experts(x_ND, r.indices_NK, r.weights_NK)
        else:
            flat = r.indices_NK.reshape(-1)
            order = flat.argsort()
            token = order // K
            xs = x_ND.index_select(0, token)
            counts = torch.bincount(flat, minlength=moe.experts.n_experts).tolist()
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    outs.append(ex.down(ex.hidden(xs[start:start + n], e), e))
                    start += n
            w = r.weights_NK.reshape(-1, 1).to(x_ND.dtype)
            ys = torch.cat(outs) * w.index_select(0, order)
            y = torch.zeros_like(x_ND).index_add_(0, token, ys)
        if shared is not None:
            return _swiglu(x_ND, *shared, acc=resid_ND + y)
        return resid_ND + y

    # ---- attention ------------------------------------------------------------------------------
    def _attention(self, a: _Attn, h_ND: torch.Tensor, s: _Step, latent_cache: torch.Tensor,
                   resid_ND: torch.Tensor) -> torch.Tensor:
        """resid + attention(h)."""
        m = a.m
        H, C, dr = m.n_heads, m.kv_lora_rank, m.rope_dim
        N = h_ND.shape[0]
        if a.qkv_a is not None:
            both = a.qkv_a(h_ND)
            Q = m.q_lora_rank
            cq, kv = a.q_norm(both[:, :Q]), both[:, Q:]  # kv: [N, C + dr]
        else:
            cq = h_ND if a.q_a is None else a.q_norm(a.q_a(h_ND))
            kv = a.kv_a(h_ND)
        q = a.q(cq)  # [N, H*Cq | H*dr]
        split = q.shape[-1] - H * dr
        c_kv = a.kv_norm(kv[:, :C])
        if s.fresh:
            return self._prefill_attention(a, h_ND, s, q, split, c_kv, kv[:, C:], latent_cache, resid_ND)
        q_pe = torch.bmm(q[:, split:].view(N, H, dr).float(), s.rope_NRR).to(s.att_dtype)
        if a.fold_q:
            qn = q[:, :split].to(s.att_dtype).view(N, H, C)
        else:
            qn = torch.einsum("nhd,hdc->nhc", q[:, :split].view(N, H, -1), a.w_uk).to(s.att_dtype)
        qa = torch.cat((qn, q_pe), dim=-1).view(s.B, s.T * H, C + dr)
        k_pe = torch.bmm(kv[:, None, C:].float(), s.rope_NRR)[:, 0]  # [N, dr]
        latent = torch.cat((c_kv, k_pe.to(c_kv.dtype)), dim=-1).view(s.B, s.T, C + dr)
        if s.start is not None:
            latent_cache[:, s.start:s.start + s.T] = latent
        else:
            latent_cache[s.rows_B1, s.positions_BT] = latent
        lat = latent_cache[:, :s.kv_len].to(s.att_dtype)  # bf16 cache -> fp32 on CPU (see _step)
        if s.mask_add is None:
            scores = torch.baddbmm(s.zero, qa, lat.transpose(1, 2), beta=0, alpha=m.scale)
        else:
            scores = torch.baddbmm(s.mask_add, qa, lat.transpose(1, 2), alpha=m.scale)
        o = torch.bmm(scores.softmax(-1), lat[:, :, :C]).view(N, H, C).to(h_ND.dtype)
        return self._out(a, o, resid_ND)

    def _out(self, a: _Attn, o_NHC: torch.Tensor, resid_ND: torch.Tensor) -> torch.Tensor:
        N, H, C = o_NHC.shape
        if a.fold_o:
            return a.o(o_NHC.reshape(N, H * C), acc=resid_ND)
        return a.o(torch.einsum("nhc,hcv->nhv", o_NHC, a.w_uv).reshape(N, -1), acc=resid_ND)

    def _prefill_attention(self, a: _Attn, h_ND, s: _Step, q, split, c_kv, k_pe, latent_cache, resid_ND
                           ) -> torch.Tensor:
        m = a.m
        B, T, H, C, dr = s.B, s.T, m.n_heads, m.kv_lora_rank, m.rope_dim
        rot = None if s.rot is None else s.rot[:, :, None]
        q_pe = _rope(q[:, split:].reshape(B, T, H, dr), rot, s.cos, s.sin, m.interleaved)
        qn = q[:, :split].view(B, T, H, -1)
        if not a.fold_q:
            qn = torch.einsum("bthd,hdc->bthc", qn, a.w_uk)
        lat = torch.cat((c_kv.view(B, T, C), _rope(k_pe.reshape(B, T, dr), s.rot, s.cos, s.sin, m.interleaved)), -1)
        latent_cache[:, :T] = lat
        if self.prefill_form == "naive":
            q_nope, q_pe = m.query(h_ND.view(B, T, -1), _Ctx(s.cos, s.sin))
            k, v = m.expand_kv(lat)
            o = causal_attention_blocked(torch.cat((q_nope, q_pe), dim=-1), k, v, m.scale)
            return resid_ND + m.o_proj(o.reshape(B * T, -1))
        qa = torch.cat((qn, q_pe), dim=-1)  # [B,T,H,C+dr]
        o = causal_attention_blocked(qa, lat[:, :, None], lat[:, :, None, :C], m.scale)  # [B,T,H,C]
        return self._out(a, o.reshape(B * T, H, C), resid_ND)

    # ---- forward --------------------------------------------------------------------------------
    def _step(self, positions_BT: torch.Tensor, x: torch.Tensor, fresh: bool) -> _Step:
        dtype, dev = x.dtype, x.device
        positions_BT = positions_BT.to(dev)
        B, T = positions_BT.shape
        cos, sin = self.model.model.rotary(positions_BT, dtype)
        s = _Step(B, T, fresh, positions_BT, cos, sin)
        if fresh:
            s.rot = torch.complex(cos.float(), sin.float()) if self.cfg.rope_interleave else None
            return s
        # the model's RoPE is linear in x: rope(I) per token is the matrix it multiplies by
        R = self.cfg.qk_rope_head_dim
        eye = torch.eye(R, device=dev).expand(B * T, R, R)
        s.rope_NRR = apply_rope(eye, cos.reshape(B * T, 1, -1), sin.reshape(B * T, 1, -1), self.cfg.rope_interleave
                                ).float()
        # decode attention's dtype: CPU bmm in bf16 is 3-4x slower than casting the latent cache to
        # fp32 and running it there (T = 1: 53 vs 19 us at 40 keys, 2.6 vs 0.6 ms at 2048; LOG)
        s.att_dtype = torch.float32 if dev.type == "cpu" else dtype
        s.zero = torch.zeros((), dtype=s.att_dtype, device=dev)  # baddbmm's ignored input (beta=0)
        lo, hi = (int(v) for v in torch.aminmax(positions_BT))
        s.kv_len = hi + 1
        if T == 1 and lo == hi:  # every row at the same position: all slots < kv_len are visible
            s.start = lo
            return s
        if bool((positions_BT[:, 1:] == positions_BT[:, :1] + torch.arange(1, T, device=dev)).all()) \
                and bool((positions_BT[:, 0] == lo).all()):
            s.start = lo  # the same consecutive positions on every row: a slice write
        else:
            s.rows_B1 = torch.arange(B, device=dev)[:, None]
        visible = torch.arange(s.kv_len, device=dev)[None, None, :] <= positions_BT[:, :, None]  # [B,T,L]
        H = self.cfg.num_attention_heads
        mask = torch.zeros(B, T, H, s.kv_len, dtype=s.att_dtype, device=dev)
        s.mask_add = mask.masked_fill_(~visible[:, :, None], float("-inf")).view(B, T * H, s.kv_len)
        return s

    def _block(self, i: int, layer, x_ND: torch.Tensor, s: _Step, latent_cache: torch.Tensor) -> torch.Tensor:
        norm_in, norm_post = self.norms[i]
        x_ND = self._attention(self.attn[i], norm_in(x_ND), s, latent_cache, x_ND)
        h = norm_post(x_ND)
        kind, mod, w = self.mlp[i]
        if kind == "dense":
            return _swiglu(h, *w, acc=x_ND)
        return self._moe(mod, w, h, x_ND)

    def __call__(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, cache: list[LayerCache],
                 last_only: bool = True, fresh: bool = False, last_index_B: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [B, T or 1, V], final-normed hidden [B, T, D]). fresh: the rows' caches are empty
        and positions are 0..T-1 (a prefill: causal attention without a mask; right-padded rows are
        fine, a real token never sees the padding after it). last_index_B: logits at these positions."""
        m = self.model
        B, T = ids_BT.shape
        x = m.model.embed_tokens(ids_BT.reshape(-1))  # [N, D]
        s = self._step(positions_BT, x, fresh)
        for i, layer in enumerate(m.model.layers):
            x = self._block(i, layer, x, s, cache[i].latent)
        hidden = self.final_norm(x).view(B, T, -1)
        if last_index_B is not None:
            h = hidden[torch.arange(B, device=hidden.device), last_index_B.to(hidden.device)]
        elif last_only:
            h = hidden[:, -1]
        else:
            h = hidden.reshape(B * T, -1)
        return self.lm_head(h).view(B, -1, self.cfg.vocab_size), hidden

    def mtp(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
            cache: list[LayerCache], fresh: bool = False) -> torch.Tensor:
        """MTP depth 1 (as MTPModule.forward) over (h_i, Emb(t_{i+1})) at the given positions -> its
        normed hidden [B,T,D]; cache: all layers' caches (the depth's is the one after the main layers)."""
        m = self.model
        L = self.cfg.num_hidden_layers
        mod = m.mtp[0]
        B, T, D = h_BTD.shape
        emb = m.model.embed_tokens(next_ids_BT.reshape(-1))
        enorm, hnorm, out_norm = self.mtp_norms[0]
        x = self.eh_proj[0](torch.cat((enorm(emb), hnorm(h_BTD.reshape(B * T, D))), dim=-1))
        x = self._block(L, mod, x, self._step(positions_BT, x, fresh), cache[L].latent)
        return out_norm(x).view(B, T, D)


class _Ctx:
    """The two fields of AttnContext that MLA.latent / MLA.query read."""

    def __init__(self, cos, sin):
        self.cos_BTR, self.sin_BTR = cos, sin
