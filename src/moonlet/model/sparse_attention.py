"""DSA: DeepSeek Sparse Attention (DeepSeek-V3.2), a lightning indexer + top-k selection inside MLA.

Per query token t the indexer scores every visible key s (paper Eq. 1, transformers' bf16 form):

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] / sqrt(d_I))          w = weights_proj(x_t) / sqrt(H_I)

q [T, H_I, d_I] = wq_b(c^Q) from the MLA query latent; k [L, d_I] = LayerNorm(wk(x)) from the hidden
state, ONE key per token shared by all indexer heads (cached next to the latent, `LayerCache.index_keys`).
RoPE rotates the first qk_rope_head_dim dims of q and k in the half-split layout (unlike MLA's
interleaved pairs). The top `index_topk` keys by I (shared by all attention heads) are the only ones
MLA attends to. Masking happens twice, as in the reference: the causal/cache mask before the top-k
(so future keys only fill the top-k when fewer than k keys are visible) and again on the selection.

Forms over the same weights (`SparseMLA`, a drop-in subclass of `MLA` with parameter names
`self_attn.indexer.{wq_b,wk,k_norm,weights_proj}` as transformers' DeepseekV32 checkpoints):
- naive: masked MHA, the selection folded into the boolean mask (training, prefill);
- absorbed: latent MQA over the gathered top-k latent entries only, O(k) per query (decode).
With k >= the number of keys every key is selected and the layer runs dense MLA unchanged.

Training (paper §2.1.1; choices in docs/LOG.md 2026-11-24): the indexer reads detached inputs, so it
learns only from `indexer_kl_loss` and the LM loss never reaches it; the target p is the main
attention's probabilities (as actually used: dense in warm-up, sparse in the sparse stage) summed
over heads and L1-normalized; in the sparse stage the KL is restricted to the selected set
(p renormalized over it). The loss is the mean over query tokens of each layer, summed over layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA, AttnContext
from .rope import apply_rope

DSA_STAGES = ("dense", "warmup", "sparse")
_CHUNK_ELEMS = 1 << 25  # bound on the elements of one chunk of scores / gathered entries


class LightningIndexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        r, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(r, ctx.cos_BTR, ctx.sin_BTR, interleaved=False), rest), dim=-1)

    def keys(self, x_BTD: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """The per-token key the cache stores, [B, T, d_I]."""
        return self._rope(self.k_norm(self.wk(x_BTD)), ctx)

    def queries(self, qr_BTQ: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """[B, T, H_I, d_I] from the MLA query latent c^Q [B, T, q_lora_rank]."""
        B, T, _ = qr_BTQ.shape
        return self._rope(self.wq_b(qr_BTQ).view(B, T, self.n_heads, self.head_dim), ctx)

    def head_weights(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """w [B, T, H_I] in float32 (transformers keeps weights_proj in fp32)."""
        return F.linear(x_BTD.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5

    def scores(self, q_BTHI: torch.Tensor, w_BTH: torch.Tensor, k_BLI: torch.Tensor,
               allowed_BTL: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, T, L] in float32, -inf where `allowed` is False."""
        B, T, H, _ = q_BTHI.shape
        L = k_BLI.shape[1]
        kT = k_BLI.float().transpose(-1, -2).unsqueeze(1)  # [B, 1, d_I, L]
        step = max(1, _CHUNK_ELEMS // max(1, B * H * L))
        out = []
        for t0 in range(0, T, step):
            s = F.relu(torch.matmul(q_BTHI[:, t0:t0 + step].float(), kT) * self.softmax_scale)  # [B,t,H,L]
            out.append(torch.matmul(w_BTH[:, t0:t0 + step].unsqueeze(-2), s).squeeze(-2))
        scores = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return scores.masked_fill(~allowed_BTL, float("-inf"))


def select_topk(scores_BTL: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k selection as a boolean mask [B, T, L] with exactly min(k, L) True per row.

    Ties at the k-th score go to the lowest key index. `topk` alone breaks ties differently for
    different shapes, and ReLU makes exact ties (score 0) common, which would let a cached decode
    step pick other keys than the full forward did; this rule depends only on the scores."""
    k = min(k, scores_BTL.shape[-1])
    kth = scores_BTL.topk(k, dim=-1).values[..., -1:]  # the k-th largest value: unique, whatever the ties
    above = scores_BTL > kth
    tied = scores_BTL == kth
    need = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= need))


def selected_indices(selected_BTL: torch.Tensor, k: int) -> torch.Tensor:
    """The key indices [B, T, k] of a selection mask with k True per row (as a set, any order)."""
    return selected_BTL.to(torch.float32).topk(k, dim=-1).indices


class SparseMLA(MLA):
    """MLA whose queries attend only to the indexer's top-k keys. forward returns
    (output [B,T,D], max logit [H] or None, indexer loss (scalar) or None)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.indexer = LightningIndexer(cfg)
        self.index_topk = cfg.index_topk
        self.stage = "sparse"  # see set_dsa_stage

    def forward(self, x_BTD: torch.Tensor, ctx: AttnContext, cache_BSC: torch.Tensor | None = None,
                index_cache_BSI: torch.Tensor | None = None):
        """cache_BSC: the latent cache; index_cache_BSI: the indexer key cache [B, max_seq, d_I]."""
        B, T, _ = x_BTD.shape
        qr = self.q_latent(x_BTD)
        q_nope, q_pe = self.query(x_BTD, ctx, qr)
        latent = self.latent(x_BTD, ctx)
        x_in, qr_in = x_BTD.detach(), qr.detach()  # the indexer learns from its own loss only
        keys = self.indexer.keys(x_in, ctx)
        if cache_BSC is not None:
            if index_cache_BSI is None:
                raise ValueError("a DSA layer needs its indexer key cache (LayerCache.index_keys); "
                                 "build caches with LayerCache.allocate")
            rows = torch.arange(B, device=x_BTD.device)[:, None]
            cache_BSC[rows, ctx.positions_BT] = latent.to(cache_BSC.dtype)
            index_cache_BSI[rows, ctx.positions_BT] = keys.to(index_cache_BSI.dtype)
            latent, keys = cache_BSC[:, : ctx.kv_len], index_cache_BSI[:, : ctx.kv_len]
        latent = latent.to(q_nope.dtype)
        L = latent.shape[1]
        if ctx.mask_B1TL is not None:
            allowed = ctx.mask_B1TL[:, 0]
        else:
            allowed = torch.ones(T, L, dtype=torch.bool, device=x_BTD.device).tril(L - T).expand(B, T, L)
        sparse = self.stage == "sparse" and self.index_topk < L
        want_loss = self.training and self.stage in ("warmup", "sparse")
        scores = selected = None
        if sparse or want_loss:
            q_i = self.indexer.queries(qr_in, ctx)
            scores = self.indexer.scores(q_i, self.indexer.head_weights(x_in), keys, allowed)
        mask = ctx.mask_B1TL
        if sparse:
            selected = select_topk(scores, self.index_topk)  # [B, T, L], k per row
            mask = (selected & allowed)[:, None]  # masked again: a short row's top-k holds masked keys
        if ctx.absorbed and sparse:
            idx = selected_indices(selected, self.index_topk)  # [B, T, k]
            out = self._absorbed_topk(q_nope, q_pe, latent, idx, allowed.gather(-1, idx))
        elif ctx.absorbed:
            out = self._absorbed(q_nope, q_pe, latent, mask)
        else:
            out = self._naive(q_nope, q_pe, latent, mask)
        max_logit = self._max_logit(q_nope, q_pe, latent, mask) if ctx.record_max_logit else None
        loss = None
        if want_loss:
            used = allowed if mask is None else mask[:, 0]
            target = attention_target(self, q_nope, q_pe, latent, used)
            loss = indexer_kl_loss(scores, target, selected)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim)), max_logit, loss

    def _absorbed_topk(self, q_nope, q_pe, latent_BLC, idx_BTK, valid_BTK) -> torch.Tensor:
        """Latent MQA over each query's own k gathered entries: [B, T, H, dv]."""
        B, T, H, _ = q_nope.shape
        K, W = idx_BTK.shape[-1], latent_BLC.shape[-1]
        w_uk, w_uv = self.w_uk_uv()
        q = torch.cat((torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_pe), dim=-1)  # [B,T,H,W]
        step = max(1, _CHUNK_ELEMS // max(1, B * K * W))
        outs = []
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            # per row index_select on the [L, W] slice (a strided view of the cache, never copied whole):
            # several times faster than advanced indexing for a decode step's 2k-of-16k gather
            kv = torch.stack([latent_BLC[b].index_select(0, idx_BTK[b, t0:t1].reshape(-1)) for b in range(B)])
            kv = kv.view(B * (t1 - t0), 1, K, W)  # [B*t, 1, K, W]
            o = F.scaled_dot_product_attention(
                q[:, t0:t1].flatten(0, 1)[:, None], kv, kv[..., : self.kv_lora_rank],
                attn_mask=valid_BTK[:, t0:t1].flatten(0, 1)[:, None, None, :], scale=self.scale,
            )  # [B*t, 1, H, C]
            outs.append(o.view(B, t1 - t0, H, self.kv_lora_rank))
        o_lat = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)


# ---- the indexer's training signal ------------------------------------------------------------------
@torch.no_grad()
def attention_target(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent_BLC: torch.Tensor,
                     allowed_BTL: torch.Tensor) -> torch.Tensor:
    """p [B, T, L] float32: MLA's attention probabilities under `allowed`, summed over heads and
    L1-normalized over keys. Computed in the absorbed form, a chunk of queries at a time."""
    B, T, H, _ = q_nope.shape
    L = latent_BLC.shape[1]
    w_uk, _ = mla.w_uk_uv()
    c_kv, k_pe = latent_BLC.split([mla.kv_lora_rank, mla.rope_dim], dim=-1)
    step = max(1, _CHUNK_ELEMS // max(1, B * H * L))
    out = []
    for t0 in range(0, T, step):
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope[:, t0:t0 + step], w_uk)
        s = torch.einsum("bthc,blc->bhtl", q_lat, c_kv) + torch.einsum("bthr,blr->bhtl", q_pe[:, t0:t0 + step], k_pe)
        s = (s.float() * mla.scale).masked_fill(~allowed_BTL[:, None, t0:t0 + step], float("-inf"))
        p = s.softmax(dim=-1).sum(dim=1)  # [B, t, L]
        out.append(p / p.sum(dim=-1, keepdim=True))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def indexer_kl_loss(scores_BTL: torch.Tensor, target_BTL: torch.Tensor,
                    selected_BTL: torch.Tensor | None = None) -> torch.Tensor:
    """mean_t KL(p_t || softmax(I_t)) over the visible keys (dense warm-up), or, given the selection
    mask, over the selected set S_t only (sparse stage; p renormalized over S_t). Masked keys have
    I = -inf and p = 0 and contribute nothing. Gradients reach only `scores` [B, T, L]."""
    p = target_BTL.detach().float()
    s = scores_BTL.float()
    if selected_BTL is not None:
        s = s.masked_fill(~selected_BTL, float("-inf"))
        p = p.masked_fill(~selected_BTL, 0.0)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    log_q = torch.log_softmax(s, dim=-1)
    pos = p > 0
    kl = torch.where(pos, p * (torch.log(p.clamp_min(1e-30)) - log_q.masked_fill(~pos, 0.0)), 0.0)
    return kl.sum(dim=-1).mean()


# ---- model-level helpers (the trainer's hooks) ------------------------------------------------------
def dsa_modules(model: nn.Module) -> list[SparseMLA]:
    return [m for m in model.modules() if isinstance(m, SparseMLA)]


def set_dsa_stage(model: nn.Module, stage: str) -> None:
    """"sparse" (default): top-k attention; in training mode the indexer also gets the sparse-stage
    KL loss. "warmup": dense attention; in training mode the indexer gets the dense KL loss (freeze
    the rest with `freeze_all_but_indexer`). "dense": dense attention, no indexer work at all."""
    if stage not in DSA_STAGES:
        raise ValueError(f"DSA stage {stage!r} must be one of {DSA_STAGES}")
    mods = dsa_modules(model)
    if not mods:
        raise ValueError("the model has no DSA layers (model_type 'deepseek_v32')")
    for m in mods:
        m.stage = stage


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in dsa_modules(model) for p in m.indexer.parameters()]


def freeze_all_but_indexer(model: nn.Module) -> list[nn.Parameter]:
    """Dense warm-up: only the indexers train. Returns the trainable parameters."""
    keep = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return indexer_parameters(model)


# ---- accounting hooks (pure functions of the config) ------------------------------------------------
def dsa_extra_params(cfg: ModelConfig) -> dict[str, int]:
    """Indexer parameters: wq_b [H_I d_I, q_lora] + wk [d_I, D] + k_norm (2 d_I) + weights_proj [H_I, D]
    per attention layer. Keys: per_layer, main, mtp (all active: every token runs the indexer)."""
    if not cfg.is_dsa:
        return {"per_layer": 0, "main": 0, "mtp": 0}
    D, H, d = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
    per = cfg.q_lora_rank * H * d + D * d + 2 * d + D * H
    return {"per_layer": per, "main": per * cfg.num_hidden_layers, "mtp": per * cfg.num_nextn_predict_layers}


def dsa_index_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: float = 2, include_mtp: bool = False) -> int:
    """Indexer key cache: one d_I key per token per layer (moonlet stores it in the cache dtype; the
    reference's fp8 + fp32 scale would be d_I + 4 bytes)."""
    if not cfg.is_dsa:
        return 0
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return int(layers * cfg.index_head_dim * dtype_bytes)


def dsa_attended_keys(cfg: ModelConfig, context_len: int) -> int:
    """Keys one query attends to at a given context length: min(index_topk, context) (all without DSA)."""
    return min(cfg.index_topk, context_len) if cfg.is_dsa else context_len


def dsa_mean_attended_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Mean over the positions of a causal sequence of the keys attended: sum_t min(k, t+1) / T."""
    if not cfg.is_dsa or cfg.index_topk >= seq_len:
        return (seq_len + 1) / 2
    k = cfg.index_topk
    return (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len


def dsa_indexer_flops_per_token(cfg: ModelConfig, context_len: float) -> float:
    """Indexer FLOPs (2 per multiply-add) per token per layer at a given (mean) context length:
    projections 2(q_lora H_I d_I + D d_I + D H_I) + scores 2 H_I d_I L + head weighting 2 H_I L."""
    if not cfg.is_dsa:
        return 0.0
    D, H, d = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
    return 2 * (cfg.q_lora_rank * H * d + D * d + D * H) + 2 * H * d * context_len + 2 * H * context_len
