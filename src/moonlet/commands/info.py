"""`moonlet info NAME_OR_PATH [--json] [--seq-len N]`: what a config costs, from the config alone.

Every number comes from `moonlet.accounting` (nothing is allocated, so the 1T-parameter presets
print instantly).
"""

from __future__ import annotations

import argparse
import json

from .. import accounting as acc
from ..config import ModelConfig, resolve_config

WEIGHT_DTYPES = ("fp32", "bf16", "fp8", "int4")
KV_DTYPES = ("fp32", "bf16", "fp8")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, KV-cache, FLOPs and memory of a preset or config.json",
                       description=__doc__)
    p.add_argument("model", metavar="NAME_OR_PATH",
                   help="preset (tiny, small, deepseek-v3, kimi-k2), a config.json, or a directory holding one")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seq-len", type=int, default=4096, metavar="N",
                   help="sequence length for the FLOPs figures (default 4096)")
    p.set_defaults(func=run)


def info_dict(cfg: ModelConfig, seq_len: int = 4096) -> dict:
    """Everything `moonlet info` reports, as plain JSON-able values."""
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    pc = acc.param_counts(cfg)
    ramp = acc.yarn_ramp(cfg)
    return {
        "model_type": cfg.model_type,
        "total_params": pc["total"],
        "active_params": pc["active"],
        "params": pc,
        "kv_cache_bytes_per_token": acc.kv_cache_bytes_per_token(cfg, 2, "latent"),
        "kv_cache_bytes_per_token_by_dtype": {
            form: {dt: acc.kv_cache_bytes_per_token(cfg, acc.dtype_bytes(dt), form) for dt in KV_DTYPES}
            for form in ("latent", "naive")
        },
        "seq_len": seq_len,
        "flops_per_token": {
            "forward": acc.flops_per_token(cfg, seq_len, training=False),
            "training": acc.flops_per_token(cfg, seq_len, training=True),
            "training_with_mtp": acc.flops_per_token(cfg, seq_len, training=True, include_mtp=True),
            "decode_absorbed": acc.flops_per_token(cfg, seq_len, training=False, form="absorbed"),
        },
        "cache_bytes_per_token_bf16": acc.kv_cache_bytes_per_token(cfg, 2, "latent", breakdown=True),
        "flops_per_token_training_breakdown": acc.flops_per_token(cfg, seq_len, training=True, breakdown=True),
        "levers": _levers(cfg, pc, seq_len),
        "weight_bytes": {dt: acc.weight_bytes(cfg, dt) for dt in WEIGHT_DTYPES},
        # what `--quantize int8|int4` stores (group 32, scales included, MTP included, the rest in bf16)
        "quantized_weight_bytes": {q: acc.quantized_weight_bytes(cfg, q)["total"] for q in ("int8", "int4")},
        "softmax_scale": acc.softmax_scale(cfg),
        "yarn_ramp": list(ramp) if ramp is not None else None,
        "shapes": _shapes(cfg),
    }


def _levers(cfg: ModelConfig, pc: dict, seq_len: int) -> dict:
    """DSA / mHC / Engram: what each adds (None when off)."""
    out: dict = {"dsa": None, "mhc": None, "engram": None}
    fl = acc.flops_per_token(cfg, seq_len, training=False, breakdown=True)
    cache = acc.kv_cache_bytes_per_token(cfg, 2, "latent", breakdown=True)
    if cfg.is_dsa:
        from ..model.sparse_attention import dsa_mean_attended_keys

        out["dsa"] = {"index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
                      "index_topk": cfg.index_topk, "indexer_params": pc["dsa_indexers"],
                      "indexer_params_mtp": pc["dsa_indexers_mtp"], "indexer_flops_forward": fl["dsa_indexer"],
                      "mean_attended_keys": dsa_mean_attended_keys(cfg, seq_len),
                      "dense_mean_attended_keys": acc.mean_causal_context(seq_len),
                      "index_key_cache_bytes_bf16": cache["dsa_index_keys"]}
    if cfg.hc_mult is not None:
        out["mhc"] = {"hc_mult": cfg.hc_mult, "params": pc["mhc"], "params_mtp": pc["mhc_mtp"],
                      "flops_forward": fl["mhc"], "residual_values_per_token": cfg.hc_mult * cfg.hidden_size}
    if cfg.engram_layers is not None:
        t = pc["engram_tables"]
        out["engram"] = {"layers": list(cfg.engram_layers), "table_params": t, "dense_params": pc["engram_dense"],
                         "table_bytes": {dt: t * acc.dtype_bytes(dt) for dt in ("fp32", "bf16")},
                         "values_read_per_token": pc["engram_values_read_per_token"],
                         "flops_forward": fl["engram"], "decode_state_bytes_bf16": cache["engram_state"],
                         "placement": "the tables are lookup-only: they count in total, not active, and may live "
                                      "in host memory (moonlet.model.engram.place_tables(model, 'cpu')); each "
                                      "token gathers its rows before the first block"}
    return out


def _shapes(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense_replace, "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
    }


def _n(x: float) -> str:
    """Human count: 671.03B, 37.6M, 4.2K (and the exact integer alongside where it matters)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:g}"


def _flops(x: float) -> str:
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f} {unit}"
    return f"{x:g} FLOP"


def _bytes(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:g} B"


def format_table(name: str, d: dict) -> str:
    s, pc = d["shapes"], d["params"]
    rows: list[tuple[str, str]] = []

    def sec(title: str) -> None:
        rows.append(("", ""))
        rows.append((f"[{title}]", ""))

    sec("shape")
    rows.append(("layers (dense + MoE)", f"{s['num_hidden_layers']} ({pc['n_dense_layers']} + {pc['n_moe_layers']})"
                 + (f", MTP depths {s['num_nextn_predict_layers']}" if s["num_nextn_predict_layers"] else "")))
    rows.append(("hidden / vocab", f"{s['hidden_size']} / {s['vocab_size']}"))
    rows.append(("attention (MLA)", f"{s['num_attention_heads']} heads, q_lora {s['q_lora_rank']}, kv_lora "
                 f"{s['kv_lora_rank']}, qk {s['qk_nope_head_dim']}+{s['qk_rope_head_dim']} (rope), v {s['v_head_dim']}"))
    rows.append(("FFN", f"dense {s['intermediate_size']}; experts {s['n_routed_experts']} routed x "
                 f"{s['moe_intermediate_size']} + {s['n_shared_experts']} shared, top-{s['num_experts_per_tok']}"
                 f", groups {s['n_group']}/{s['topk_group']}" if s["n_routed_experts"] else f"dense {s['intermediate_size']}"))
    sec("parameters")
    rows.append(("total (no MTP)", f"{pc['total']:,} ({_n(pc['total'])})"))
    rows.append(("total excl. embedding", f"{pc['total_excl_embedding']:,} ({_n(pc['total_excl_embedding'])})"))
    rows.append(("active (incl. embedding + head)", f"{pc['active']:,} ({_n(pc['active'])})"))
    rows.append(("active excl. embedding", f"{pc['active_excl_embedding']:,} ({_n(pc['active_excl_embedding'])})"))
    rows.append(("active excl. embedding + head", f"{pc['active_excl_embedding_and_head']:,} "
                 f"({_n(pc['active_excl_embedding_and_head'])})"))
    if pc["mtp"]:
        rows.append(("MTP depths (own tensors)", f"{pc['mtp']:,} ({_n(pc['mtp'])}); total with MTP "
                     f"{_n(pc['total_with_mtp'])}"))
    lev = d["levers"]
    if any(lev.values()):
        sec("levers (included in the totals above and below)")
    if lev["dsa"]:
        x = lev["dsa"]
        rows.append(("DSA indexers", f"{x['index_n_heads']} heads x {x['index_head_dim']}, top-{x['index_topk']}: "
                     f"{x['indexer_params']:,} params ({_n(x['indexer_params'])}, active)"))
        rows.append(("DSA keys attended (mean)", f"{x['mean_attended_keys']:.1f} of {x['dense_mean_attended_keys']:.1f} "
                     f"at seq len {d['seq_len']}; indexer {_flops(x['indexer_flops_forward'])}/token fwd"))
        rows.append(("DSA index keys", f"{x['index_key_cache_bytes_bf16']:,} B/token (bf16, all layers)"))
    if lev["mhc"]:
        x = lev["mhc"]
        rows.append(("mHC", f"{x['hc_mult']} residual streams: {x['params']:,} params ({_n(x['params'])}), "
                     f"{_flops(x['flops_forward'])}/token fwd, {x['residual_values_per_token']:,} residual "
                     f"values per token"))
    if lev["engram"]:
        x = lev["engram"]
        rows.append(("Engram tables", f"{x['table_params']:,} params ({_n(x['table_params'])}; bf16 "
                     f"{_bytes(x['table_bytes']['bf16'])}) at layers {x['layers']}: total only, not active; "
                     f"host-memory capable (place_tables)"))
        rows.append(("Engram per token", f"reads {x['values_read_per_token']:,} table values; dense part "
                     f"{x['dense_params']:,} params, {_flops(x['flops_forward'])} fwd; decode state "
                     f"{x['decode_state_bytes_bf16']:,} B (bf16)"))
    sec("KV cache per token (all layers)")
    for form, label in (("latent", "latent (MLA absorbed)"), ("naive", "naive per-head K/V")):
        by = d["kv_cache_bytes_per_token_by_dtype"][form]
        rows.append((label, ", ".join(f"{dt} {by[dt]:,} B" for dt in KV_DTYPES)))
    lat, nai = (d["kv_cache_bytes_per_token_by_dtype"][f]["bf16"] for f in ("latent", "naive"))
    rows.append(("naive / latent", f"{nai / lat:.1f}x"))
    cb = d["cache_bytes_per_token_bf16"]
    if cb["dsa_index_keys"] or cb["engram_state"]:
        rows.append(("of which (bf16, latent)", f"MLA latent {cb['attention']:,} B + DSA index keys "
                     f"{cb['dsa_index_keys']:,} B + Engram state {cb['engram_state']:,} B"))
    sec(f"FLOPs per token at seq len {d['seq_len']} (matmuls, causal)")
    f = d["flops_per_token"]
    rows.append(("forward", f"{f['forward'] / 1e9:.3f} GFLOP"))
    rows.append(("training (3x forward, no MTP)", f"{f['training'] / 1e9:.3f} GFLOP"))
    rows.append(("training incl. MTP", f"{f['training_with_mtp'] / 1e9:.3f} GFLOP"))
    rows.append(("forward, absorbed MLA (decode form)", f"{f['decode_absorbed'] / 1e9:.3f} GFLOP"))
    tb = d["flops_per_token_training_breakdown"]
    lever_parts = [(k, tb[k]) for k in ("dsa_indexer", "dsa_kl_target", "mhc", "engram") if tb[k]]
    if lever_parts:
        rows.append(("training, of which levers", ", ".join(f"{k} {_flops(v)}" for k, v in lever_parts)))
    sec("weight memory (no MTP)")
    rows.append(("", ", ".join(f"{dt} {_bytes(b)}" for dt, b in d["weight_bytes"].items())))
    rows.append(("--quantize (scales, MTP incl.)", ", ".join(f"{q} {_bytes(b)}" for q, b in
                                                              d["quantized_weight_bytes"].items())
                 + " (embeddings, norms, router, lm_head in bf16)"))
    sec("attention")
    rows.append(("softmax scale", f"{d['softmax_scale']:.6f}"))
    ramp = d["yarn_ramp"]
    rows.append(("YaRN ramp (low, high)", "none (no rope_scaling)" if ramp is None else
                 f"({ramp[0]}, {ramp[1]}), factor {s['rope_scaling']['factor']}"))
    width = max(len(k) for k, _ in rows if not k.startswith("["))
    lines = [f"moonlet info: {name} ({d['model_type']})"]
    for k, v in rows:
        lines.append(k if k.startswith("[") or not k and not v else f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.model)
    d = info_dict(cfg, args.seq_len)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_table(str(args.model), d))
    return 0
