"""Accounting from a config alone: parameters, KV-cache bytes, FLOPs, weight memory.

The ONE place for these formulas: `moonlet info`, the planner and the benchmarks call these
functions, never their own copies. Nothing is allocated; every number is arithmetic on the
`ModelConfig` fields, and tests cross-check the counts against a `CausalLM` built on the meta device.

Conventions (each function's docstring repeats the ones it uses):
- *total* parameters count every tensor of the main model's checkpoint: input embedding, lm_head
  (once when tied), all layers, norms, the router's `e_score_correction_bias` buffer. MTP depths are
  reported separately (`mtp`) and excluded from `total`, as in DeepSeek-V3's published 671B.
- *active* parameters are those one token touches: attention, norms, dense MLPs, and per MoE layer
  the router (+ bias), `num_experts_per_tok` routed experts and the shared experts, plus the head
  and the input embedding (DeepSeek's convention for "37B activated"); `_excl_embedding` variants say
  which ends are dropped.
- FLOPs count matrix multiplies only (2 per multiply-add), including attention's QK^T and PV with a
  causal mask; norms, activations, RoPE, softmax and the embedding lookup are not counted.
- The levers (DSA, mHC, Engram) add their own terms from the pure functions next to their modules
  (`model/sparse_attention.py`, `model/hyper.py`, `model/engram.py`): DSA's indexers are active
  parameters, its attention attends min(index_topk, context) keys and its index keys sit in the
  cache; mHC's mappings are active; Engram's tables count in the total only (a token reads
  heads x orders rows of them), its projections, norms and conv are active.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

# bytes per element of the dtypes accounting understands; int4 is packed two per byte
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "float32": 4, "tf32": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
    "fp8": 1, "float8_e4m3fn": 1, "int8": 1,
    "int4": 0.5,
}


def dtype_bytes(dtype: str | float | int) -> float:
    """Bytes per element for a dtype name ("bf16", "fp8", ...) or a number passed through."""
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool):
        if dtype <= 0:
            raise ValueError(f"bytes per element must be positive, got {dtype}")
        return float(dtype)
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


_bytes_of = dtype_bytes  # for functions whose argument is itself named `dtype_bytes` (the contract's name)


# ---- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of the pieces of one decoder layer (elements, not bytes)."""

    attention: int  # q (LoRA or plain), kv_a, kv norm, kv_b, o_proj (+ biases)
    attention_matmul: int  # the part of `attention` that is matrix weights (no norms, no biases)
    norms: int  # input_layernorm + post_attention_layernorm
    dense_mlp: int  # SwiGLU with intermediate_size
    expert: int  # one routed expert (SwiGLU with moe_intermediate_size)
    shared: int  # all shared experts together
    router: int  # gate.weight [E, D]
    router_bias: int  # e_score_correction_bias [E] (noaux_tc only)


def layer_params(cfg: ModelConfig) -> LayerParams:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, C, R = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    bias = bool(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        q_mat, q_other = D * H * qk, 0
    else:
        Q = cfg.q_lora_rank
        q_mat = D * Q + Q * H * qk
        q_other = Q + (Q if bias else 0)  # q_a_layernorm (+ q_a_proj bias)
    kv_mat = D * (C + R) + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    kv_other = C + ((C + R) if bias else 0)  # kv_a_layernorm (+ kv_a bias)
    o_mat, o_other = H * cfg.v_head_dim * D, (D if bias else 0)
    attn_mat = q_mat + kv_mat + o_mat
    E = cfg.n_routed_experts or 0
    Ie = cfg.moe_intermediate_size
    return LayerParams(
        attention=attn_mat + q_other + kv_other + o_other,
        attention_matmul=attn_mat,
        norms=2 * D,
        dense_mlp=3 * D * cfg.intermediate_size,
        expert=3 * D * Ie,
        shared=3 * D * Ie * (cfg.n_shared_experts or 0),
        router=E * D,
        router_bias=E if (E and cfg.topk_method == "noaux_tc") else 0,
    )


def _moe_layer_total(cfg: ModelConfig, lp: LayerParams) -> int:
    return lp.router + lp.router_bias + cfg.n_routed_experts * lp.expert + lp.shared


def _moe_layer_active(cfg: ModelConfig, lp: LayerParams) -> int:
    return lp.router + lp.router_bias + cfg.num_experts_per_tok * lp.expert + lp.shared


def _mtp_extra(cfg: ModelConfig) -> int:
    """What an MTP depth adds beyond its block: enorm, hnorm, eh_proj [D, 2D], shared_head.norm."""
    D = cfg.hidden_size
    return 3 * D + 2 * D * D


def n_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def lever_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters the levers add (0 when off). Keys: dsa_indexers, dsa_indexers_mtp, mhc, mhc_mtp,
    engram_tables, engram_dense, engram_values_read_per_token (table elements one token gathers)."""
    out = dict.fromkeys(("dsa_indexers", "dsa_indexers_mtp", "mhc", "mhc_mtp", "engram_tables", "engram_dense",
                         "engram_values_read_per_token"), 0)
    if cfg.is_dsa:
        from .model.sparse_attention import dsa_extra_params

        d = dsa_extra_params(cfg)
        out.update(dsa_indexers=d["main"], dsa_indexers_mtp=d["mtp"])
    if cfg.hc_mult is not None:
        from .model.hyper import mhc_extra_params

        m = mhc_extra_params(cfg)
        out.update(mhc=m["main"], mhc_mtp=m["mtp"])
    if cfg.engram_layers is not None:
        from .model.engram import engram_params

        e = engram_params(cfg)
        out.update(engram_tables=e["tables"], engram_dense=e["dense"],
                   engram_values_read_per_token=e["rows_read_per_token"])
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts (elements) of the model a config describes, nothing allocated.

    Keys:
      total                       every tensor of the main model (embedding, layers, norms, correction
                                  biases, lm_head; a tied head counted once), MTP excluded
      total_excl_embedding        total minus the input embedding
      total_excl_embedding_and_head
      active                      per token: attention, norms, dense MLPs, router (+ bias), top-k routed
                                  + shared experts, final norm, lm_head and the input embedding
      active_excl_embedding, active_excl_embedding_and_head
      mtp, mtp_active             the MTP depths' own tensors (their embedding/head are the main ones,
                                  shared; DeepSeek's checkpoint stores copies, see `mtp_checkpoint_copies`)
      total_with_mtp, active_with_mtp
      mtp_checkpoint_copies       extra elements in a DeepSeek-format checkpoint that stores each depth's
                                  embed_tokens and shared_head.head
      embedding, lm_head, per_layer_attention, dense_layer, moe_layer, moe_layer_active, expert,
      n_dense_layers, n_moe_layers
      + the `lever_params` keys: DSA indexers and mHC mappings count in total and active (MTP
      depths' copies in mtp / mtp_active); Engram tables in total only, its dense part in both
    """
    lp = layer_params(cfg)
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    n_moe = n_moe_layers(cfg)
    n_dense = L - n_moe
    emb = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    dense_layer = lp.attention + lp.norms + lp.dense_mlp
    moe_total = lp.attention + lp.norms + _moe_layer_total(cfg, lp) if cfg.is_moe else 0
    moe_active = lp.attention + lp.norms + _moe_layer_active(cfg, lp) if cfg.is_moe else 0
    final_norm = D
    body_total = n_dense * dense_layer + n_moe * moe_total + final_norm
    body_active = n_dense * dense_layer + n_moe * moe_active + final_norm
    # an MTP depth's block is a MoE layer when the model is MoE (as in DeepSeek-V3), else dense
    mtp_block_total = moe_total if cfg.is_moe else dense_layer
    mtp_block_active = moe_active if cfg.is_moe else dense_layer
    k = cfg.num_nextn_predict_layers
    lev = lever_params(cfg)
    mtp = k * (mtp_block_total + _mtp_extra(cfg)) + lev["dsa_indexers_mtp"] + lev["mhc_mtp"]
    mtp_active = k * (mtp_block_active + _mtp_extra(cfg)) + lev["dsa_indexers_mtp"] + lev["mhc_mtp"]
    lever_dense = lev["dsa_indexers"] + lev["mhc"] + lev["engram_dense"]
    total = emb + head + body_total + lever_dense + lev["engram_tables"]
    active = emb + head + body_active + lever_dense
    # a tied head shares the embedding's tensor; "excl. embedding" then still keeps the head's matrix
    emb_excl = 0 if cfg.tie_word_embeddings else emb
    return {
        "total": total,
        "total_excl_embedding": total - emb_excl,
        "total_excl_embedding_and_head": total - emb - head,
        "active": active,
        "active_excl_embedding": active - emb_excl,
        "active_excl_embedding_and_head": active - emb - head,
        "mtp": mtp,
        "mtp_active": mtp_active,
        "total_with_mtp": total + mtp,
        "active_with_mtp": active + mtp_active,
        "mtp_checkpoint_copies": k * 2 * V * D,
        "embedding": emb,
        "lm_head": V * D,
        "per_layer_attention": lp.attention,
        "dense_layer": dense_layer,
        "moe_layer": moe_total,
        "moe_layer_active": moe_active,
        "expert": lp.expert,
        "n_dense_layers": n_dense,
        "n_moe_layers": n_moe,
        **lev,
    }


def expert_param_count(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Elements in routed experts (what expert parallelism partitions)."""
    if not cfg.is_moe:
        return 0
    layers = n_moe_layers(cfg) + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return layers * cfg.n_routed_experts * layer_params(cfg).expert


# ---- KV cache ------------------------------------------------------------------------------------
def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: float | str = 2, form: str = "latent",
                             include_mtp: bool = False, breakdown: bool = False) -> float | dict[str, float]:
    """Bytes one token adds to the inference cache, over all main layers (MTP depths only if asked).

    latent: what MLA's absorbed form caches: RMSNorm(c_kv) [kv_lora_rank] + roped k_pe [rope_dim] per
            layer, shared by all heads (DeepSeek-V3 in BF16: 61 x 576 x 2 = 70,272 B).
    naive:  per-head K [H, nope + rope] and V [H, v_head_dim] per layer, as a plain MHA cache holds them.
    Plus what the levers keep per token (either form): DSA's index key [index_head_dim] per layer, in
    the cache dtype; Engram's decode state per Engram layer (an int64 id, the row e_t and the gates).
    breakdown=True: {"attention", "dsa_index_keys", "engram_state", "total"}.
    """
    b = _bytes_of(dtype_bytes)
    if form == "latent":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif form == "naive":
        per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        raise ValueError(f"form must be 'latent' or 'naive', got {form!r}")
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    parts = {"attention": layers * per_layer * b, "dsa_index_keys": 0, "engram_state": 0}
    if cfg.is_dsa:
        from .model.sparse_attention import dsa_index_cache_bytes_per_token

        parts["dsa_index_keys"] = dsa_index_cache_bytes_per_token(cfg, b, include_mtp)
    if cfg.engram_layers is not None:
        from .model.engram import engram_cache_bytes_per_token

        parts["engram_state"] = engram_cache_bytes_per_token(cfg, b)
    parts = {k: int(v) if float(v).is_integer() else v for k, v in parts.items()}
    n = sum(parts.values())
    n = int(n) if float(n).is_integer() else n
    return {**parts, "total": n} if breakdown else n


# ---- FLOPs ---------------------------------------------------------------------------------------
def mean_causal_context(seq_len: int) -> float:
    """Keys a query sees on average in a causal sequence of `seq_len` tokens: (seq_len + 1) / 2."""
    return (seq_len + 1) / 2


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool, *, include_mtp: bool = False,
                    form: str = "naive", breakdown: bool = False) -> float | dict[str, float]:
    """Matmul FLOPs per token (2 per multiply-add) for a causal sequence of `seq_len` tokens.

    Forward, per token: 2 x (active matrix weights, lm_head included, embedding lookup excluded) plus
    attention's quadratic part 2 x H x (qk_head_dim + v_head_dim) x ctx per layer, where
    ctx = (seq_len + 1)/2 is the mean number of keys a query attends to under the causal mask
    (token i sees i + 1 keys; a kernel that skips masked blocks does this work, no more).
    Training = 3 x forward (backward does two matmuls per forward matmul: input and weight grads);
    this is *model* FLOPs: activation recomputation is not counted, as MFU conventionally excludes it.
    The router's [E, D] matmul is counted (every token scores every expert); norms, SwiGLU's elementwise
    product, RoPE, softmax and the loss are not. MTP depths are excluded unless `include_mtp`
    (each depth adds its block, eh_proj and one more lm_head pass).

    form="absorbed" gives the decode-form cost of attention instead: q_nope is mapped into the latent
    (W_UK), scores and values run over the (kv_lora_rank + rope)-dim latent, then W_UV; kv_b_proj is
    never applied to cached tokens.

    Levers: with DSA a query attends min(index_topk, i + 1) keys (mean `dsa_mean_attended_keys`), and
    the indexer adds its projections and its scores over every visible key (`dsa_indexer`, at the
    causal mean context); in training the indexer's KL target (MLA's scores over every visible key,
    absorbed form, forward only) adds `dsa_kl_target` once (not 3x). mHC adds its coefficient
    projections and stream mixing (`mhc`), Engram its value/key projections (`engram`; the table
    lookup is a gather, not FLOPs). These are model FLOPs: moonlet's training forward computes DSA's
    attention as dense attention under the top-k mask, so its own work does not shrink at train time.

    DeepSeek-V3 at 4K: 6 x 36.6B + 3 x 61 x 2 x 128 x 320 x 2048.5 = 250.5 GFLOPs training, matching
    the published 250 GFLOPs/token (ISCA '25 Table 2).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if form not in ("naive", "absorbed"):
        raise ValueError(f"form must be 'naive' or 'absorbed', got {form!r}")
    lp = layer_params(cfg)
    D, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    n_moe = n_moe_layers(cfg)
    n_dense = L - n_moe
    C, dn, dv, R = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim
    ctx = mean_causal_context(seq_len)
    attended = ctx
    if cfg.is_dsa:
        from .model.sparse_attention import dsa_indexer_flops_per_token, dsa_mean_attended_keys

        attended = dsa_mean_attended_keys(cfg, seq_len)

    attn_proj = lp.attention_matmul
    if form == "naive":
        attn_quadratic = 2 * H * (cfg.qk_head_dim + dv) * attended
    else:  # absorbed: no kv_b expansion; W_UK on q, W_UV on the output, attention over the latent
        attn_proj = attn_proj - C * H * (dn + dv) + H * dn * C + H * C * dv
        attn_quadratic = 2 * H * ((C + R) + C) * attended
    ffn_dense = lp.dense_mlp
    ffn_moe = (lp.router + cfg.num_experts_per_tok * lp.expert + lp.shared) if cfg.is_moe else 0
    head = D * cfg.vocab_size

    parts = {
        "attention_projections": 2 * L * attn_proj,
        "attention_quadratic": L * attn_quadratic,
        "dense_mlp": 2 * n_dense * ffn_dense,
        "moe": 2 * n_moe * ffn_moe,
        "lm_head": 2 * head,
        "dsa_indexer": 0.0,
        "mhc": 0.0,
        "engram": 0.0,
        "mtp": 0.0,
        "dsa_kl_target": 0.0,
    }
    indexer = mhc_sub = 0.0
    if cfg.is_dsa:
        indexer = dsa_indexer_flops_per_token(cfg, ctx)
        parts["dsa_indexer"] = L * indexer
    if cfg.hc_mult is not None:
        from .model.hyper import mhc_flops_per_token

        m = mhc_flops_per_token(cfg)
        mhc_sub = m["per_sublayer"]
        parts["mhc"] = m["main"]
    if cfg.engram_layers is not None:
        from .model.engram import engram_flops_per_token

        parts["engram"] = engram_flops_per_token(cfg)
    if include_mtp and cfg.num_nextn_predict_layers:
        ffn = ffn_moe if cfg.is_moe else ffn_dense
        per_depth = 2 * (attn_proj + ffn + 2 * D * D + head) + attn_quadratic + indexer + 2 * mhc_sub
        parts["mtp"] = cfg.num_nextn_predict_layers * per_depth
    mult = 3 if training else 1
    parts = {k: float(v * mult) for k, v in parts.items()}
    if training and cfg.is_dsa:  # the KL target: q_nope -> latent, then scores over every visible key
        layers = L + (cfg.num_nextn_predict_layers if include_mtp else 0)
        parts["dsa_kl_target"] = float(layers * (2 * H * dn * C + 2 * H * (C + R) * ctx))
    total = sum(parts.values())
    if breakdown:
        return {**parts, "total": total}
    return total


# ---- memory --------------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, dtype: str | float = "bf16", include_mtp: bool = False) -> float:
    """Bytes to hold the weights with every tensor at `dtype` width (int4: half a byte per element).

    A plain width x count: quantization scales and tensors kept wider in practice (norms, the
    correction bias, often embeddings and router) are not modelled; they change the total by < 1%
    for the big presets. `quantized_weight_bytes` gives the exact figure for moonlet's int8/int4.
    """
    n = param_counts(cfg)["total_with_mtp" if include_mtp else "total"]
    return n * dtype_bytes(dtype)


def quant_tensor_bytes(shape: tuple[int, ...], scheme: str, group_size: int = 32) -> int:
    """Bytes of one weight [..., N, K] in moonlet.model.quant's formats: int8 = 1 byte per element + a
    bf16 scale per output row; int4 = half a byte per element + a bf16 scale per group_size inputs."""
    *lead, N, K = shape
    rows = N
    for d in lead:
        rows *= d
    if scheme == "int8":
        return rows * K + rows * 2
    if scheme == "int4":
        return rows * K // 2 + rows * (K // group_size) * 2
    raise ValueError(f"unknown quantization {scheme!r}; choose one of: int8, int4")


def quantized_weight_bytes(cfg: ModelConfig, scheme: str, group_size: int = 32, dtype: str = "bf16",
                           skip=None, experts_only: bool = False) -> dict[str, float]:
    """Weight memory after `moonlet.model.quant.quantize_model(model, scheme, group_size, skip, experts_only)` of a
    model whose float tensors are `dtype`: {"quantized", "float", "total"} bytes, MTP included, scales
    counted. The tensors are enumerated on the meta device (nothing allocated), so this is exactly the
    set quantize_model replaces; float32-pinned buffers (the router's correction bias) count 4 bytes.
    """
    import torch

    from .model import CausalLM
    from .model.quant import DEFAULT_SKIP, quant_targets

    with torch.device("meta"):
        model = CausalLM(cfg)
    targets, _ = quant_targets(model, scheme, group_size, DEFAULT_SKIP if skip is None else skip, experts_only)
    replaced, q_bytes = set(), 0
    for name, mod in targets.items():
        for pname, p in mod.named_parameters(prefix=name):
            if p.ndim >= 2:  # a Linear's bias stays in float (QuantLinear keeps it)
                replaced.add(pname)
                q_bytes += quant_tensor_bytes(tuple(p.shape), scheme, group_size)
    width = dtype_bytes(dtype)
    f_bytes, seen = 0.0, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in replaced or id(t) in seen:
            continue
        seen.add(id(t))
        f_bytes += t.numel() * (4 if t.dtype == torch.float32 and name.endswith("e_score_correction_bias")
                                else width if t.is_floating_point() else t.element_size())
    return {"quantized": float(q_bytes), "float": f_bytes, "total": q_bytes + f_bytes}


# ---- attention scale and YaRN (re-exported from the model so `info` has one import) -------------
def softmax_scale(cfg: ModelConfig) -> float:
    from .model.rope import softmax_scale as _s

    return _s(cfg)


def yarn_ramp(cfg: ModelConfig) -> tuple[float, float] | None:
    """YaRN's (low, high) dims of the frequency ramp, or None without YaRN."""
    y = cfg.yarn
    if y is None:
        return None
    from .model.rope import yarn_correction_range

    return yarn_correction_range(y["beta_fast"], y["beta_slow"], cfg.qk_rope_head_dim, float(cfg.rope_theta),
                                 y["original_max_position_embeddings"], y["truncate"])
