"""Which moonlet configs transformers can load, and a clear error for the ones it cannot.

moonlet's own checkpoints can hold anything `ModelConfig` describes; an *export for transformers*
must be a config + weights that `AutoModelForCausalLM` loads as the same model. mHC and Engram have
no transformers model; DSA exports as `DeepseekV32ForCausalLM`, which hard-codes parts of the model
that moonlet keeps configurable.
"""

from __future__ import annotations

from ..config import ModelConfig


class HFExportError(ValueError):
    """The model uses options transformers cannot load; the message lists each one."""


def hf_export_blockers(cfg: ModelConfig) -> list[str]:
    """Reasons transformers would not load this config as the same model ([] = exportable)."""
    out: list[str] = []
    if cfg.hc_mult is not None:
        out.append(f"hc_mult={cfg.hc_mult}: mHC hyper-connections are moonlet-only (transformers has no model "
                   f"with them); a checkpoint with them loads only in moonlet")
    if cfg.engram_layers is not None:
        out.append(f"engram_layers={cfg.engram_layers}: Engram memory is moonlet-only (transformers has no model "
                   f"with it); a checkpoint with it loads only in moonlet")
    if cfg.is_dsa:  # DeepseekV32ForCausalLM's fixed choices
        if not cfg.rope_interleave:
            out.append("rope_interleave=false: transformers' DeepSeek-V3.2 always reads MLA rope rows interleaved")
        if not cfg.is_moe:
            out.append("a dense model (n_routed_experts null): transformers' DeepSeek-V3.2 always builds MoE layers")
        else:
            if cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc":
                out.append(f"scoring_func={cfg.scoring_func!r}, topk_method={cfg.topk_method!r}: transformers' "
                           f"DeepSeek-V3.2 router is sigmoid + noaux_tc only")
            if cfg.moe_layer_freq != 1:
                out.append(f"moe_layer_freq={cfg.moe_layer_freq}: transformers' DeepSeek-V3.2 makes every layer "
                           f"after first_k_dense_replace MoE")
    return out


def check_hf_exportable(cfg: ModelConfig) -> None:
    """Raise HFExportError naming every option transformers cannot load."""
    blockers = hf_export_blockers(cfg)
    if blockers:
        raise HFExportError("this model cannot be exported for transformers:\n  - " + "\n  - ".join(blockers))
