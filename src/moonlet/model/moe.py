"""DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts.

Router (noaux_tc, DeepSeek-V3 / Kimi-K2): sigmoid scores; `e_score_correction_bias` is added for
*selection only*; with n_group > 1 only the `topk_group` groups with the best top-2 sums compete;
the gate weights are the unbiased scores of the chosen experts, renormalized (norm_topk_prob) and
multiplied by routed_scaling_factor. Softmax + greedy / group_limited_greedy is the V2 form.

Experts run by token-sorted dispatch: (token, expert) pairs are sorted by expert so each expert
sees one contiguous slice; only experts that received tokens do any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cpu import CPU_NATIVE_BF16


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim (in no particular order). Inside a compiled
    graph, for small k, as k argmax passes: inductor has no topk kernel and calls out to aten, which
    splits the fused kernels around it; argmax is a reduction it fuses (compiled decode step, LOG
    2026-12-02)."""
    if not torch.compiler.is_compiling() or k > 8:
        return x.topk(k, dim=-1, sorted=False).indices
    iota = torch.arange(x.shape[-1], device=x.device)
    picked = []
    for _ in range(k):
        i = x.argmax(-1, keepdim=True)
        picked.append(i)
        x = x.masked_fill(iota == i, float("-inf"))
    return torch.cat(picked, -1)


@dataclass
class Routing:
    weights_NK: torch.Tensor  # float32 gate weights of the chosen experts
    indices_NK: torch.Tensor  # int64 expert ids
    scores_NE: torch.Tensor  # float32 affinities (sigmoid or softmax), before bias


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            # moved by the trainer's balancing rule, never by gradients; always kept in float32
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=self.e_score_correction_bias.device, dtype=torch.float32)
        return self

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits = F.linear(x_ND.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        E, G, K = self.n_experts, self.n_group, self.top_k
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
            if G > 1:
                grouped = choice.view(-1, G, E // G)
                group_score = grouped.gather(-1, topk_indices(grouped, 2)).sum(-1)  # top-2 sums [N, G]
                choice = self._mask_groups(choice, group_score, float("-inf"))
        elif self.topk_method == "group_limited_greedy":
            choice = scores
            if G > 1:
                choice = self._mask_groups(choice, scores.view(-1, G, E // G).amax(-1), 0.0)
        else:  # greedy
            choice = scores
        indices = topk_indices(choice, K)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and K > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * self.scaling, indices, scores)

    def _mask_groups(self, choice_NE, group_score_NG, fill: float) -> torch.Tensor:
        G = group_score_NG.shape[1]
        keep = topk_indices(group_score_NG, self.topk_group)
        group_mask = torch.zeros_like(group_score_NG, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask[:, :, None].expand(-1, G, self.n_experts // G).reshape(-1, self.n_experts)
        return choice_NE.masked_fill(~expert_mask, fill)


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate/up [E, I, D], down [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    # data-dependent group sizes: run eagerly when the model is compiled (its GEMMs are library calls anyway)
    @torch.compiler.disable
    def forward(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        N, K = indices_NK.shape
        flat = indices_NK.reshape(-1)
        order = flat.argsort(stable=True)  # (token, k) pairs grouped by expert
        token = order // K
        counts = torch.bincount(flat, minlength=self.n_experts)
        dtype = _compute_dtype(x_ND)
        w_sorted = weights_NK.reshape(-1).index_select(0, order)
        if _grouped_mm_ok(x_ND.device, dtype):
            # one grouped GEMM per projection over the expert-sorted rows (no per-expert Python loop,
            # no host sync); grouped_mm is not autocast-aware, so cast to the compute dtype here
            # (before the gather: N rows to cast instead of N * K)
            if jit_per_shape(x_ND.device, dtype):
                # padding rows gather token 0 with gate weight 0: their outputs are exact zeros (for
                # finite activations) and their gradients vanish, and x needs no zero-padded copy
                # (LOG 2026-12-02, trainspeed)
                rows, pad, counts = _padded_rows(counts, N * K, GROUP_ROWS)
                token = token.new_zeros(pad).index_copy_(0, rows, token)
                w_sorted = w_sorted.new_zeros(pad).index_copy_(0, rows, w_sorted)
            xs = x_ND.to(dtype).index_select(0, token)  # (index_select: its backward is 2-4x cheaper than x[idx]'s)
            offs = counts.cumsum(0, dtype=torch.int32)
            gate = F.grouped_mm(xs, self.gate_proj.to(dtype).transpose(1, 2), offs=offs)
            up = F.grouped_mm(xs, self.up_proj.to(dtype).transpose(1, 2), offs=offs)
            # the gate weight scales the down projection's input (I wide) rather than its output (D wide):
            # the same product, one narrower elementwise pass in the compute dtype
            h = F.silu(gate) * up * w_sorted[:, None].to(dtype)
            y_sorted = F.grouped_mm(h, self.down_proj.to(dtype).transpose(1, 2), offs=offs)
        else:
            # unbind once: indexing the stacked weight per expert would make autograd build a full
            # [E, ...] zero gradient for every expert (E^2 work)
            x_sorted = x_ND.index_select(0, token)
            w_gate, w_up, w_down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                xe = x_sorted[start:start + n]
                outs.append((F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())) @ w_down[e].t())
                start += n
            y_sorted = torch.cat(outs) * w_sorted[:, None].to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token, y_sorted.to(x_ND.dtype))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# oneDNN (torch's CPU bf16/fp16 GEMMs where the CPU has bf16 instructions) JIT-compiles a kernel per
# new row count, ~1.4 ms each against ~0.1 ms for the GEMM, and a training step's expert groups change
# size every step: rounding each group up to a multiple of GROUP_ROWS keeps the set of shapes small and
# cached (small bf16 training step: LOG 2026-12-02 "a different VM (Intel Xeon with AMX)")
GROUP_ROWS = 32


def jit_per_shape(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and CPU_NATIVE_BF16 and dtype in (torch.bfloat16, torch.float16)


def _padded_rows(counts_E: torch.Tensor, n_rows: int, multiple: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Where each of the n_rows expert-sorted rows goes when every group is padded to a multiple of
    `multiple` rows -> (row positions, padded row count, padded group sizes)."""
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    shift_E = padded_E.cumsum(0) - counts_E.cumsum(0)  # zero rows inserted before the end of each group
    expert_R = torch.repeat_interleave(torch.arange(len(counts_E), device=counts_E.device), counts_E,
                                       output_size=n_rows)
    rows = torch.arange(n_rows, device=counts_E.device) + (shift_E - (padded_E - counts_E)).index_select(0, expert_R)
    return rows, int(padded_E.sum()), padded_E


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs this dtype here: fp32/bf16/fp16 on CPU, bf16 on CUDA >= SM80."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass
class MoEStats:
    load_E: torch.Tensor  # tokens routed to each expert in this forward (int64)
    aux_loss: torch.Tensor | None  # sequence-wise balance loss (already times alpha), training only


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.aux_alpha = 0.0  # set by the trainer; the released configs' aux_loss_alpha is V2-era

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        r = self.gate(x)
        y = self.experts(x, r.indices_NK, r.weights_NK)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        load = torch.bincount(r.indices_NK.reshape(-1), minlength=self.gate.n_experts)
        aux = None
        if self.training and self.aux_alpha > 0:
            aux = self.aux_alpha * sequence_balance_loss(r.scores_NE.view(B, T, -1), r.indices_NK.view(B, T, -1))
        return y.view(B, T, D), MoEStats(load, aux)


def sequence_balance_loss(scores_BTE: torch.Tensor, indices_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise loss sum_i f_i P_i, averaged over sequences.

    f_i = E/(K*T) * #tokens of the sequence routed to i;  P_i = mean_t of normalized affinity s_i/sum_j s_j.
    """
    B, T, E = scores_BTE.shape
    K = indices_BTK.shape[-1]
    hits = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, indices_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device))
    f = hits * (E / (K * T))
    p = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()
