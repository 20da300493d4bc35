"""`ModelConfig`: one dataclass for the DeepSeek-V3 / Kimi-K2 family.

Field names are the Hugging Face `config.json` names, so a hub config loads with no renaming and a
moonlet config is a valid `config.json`. Keys moonlet does not know are kept in `extra` and written
back unchanged. Both RoPE spellings are read: the hub's `rope_theta` + `rope_scaling` and
transformers 5's `rope_parameters`; the spelling that was read is the one that is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a valid model; the message names the field."""


SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MODEL_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v2", "deepseek_v32")
# keys of an HF config.json that describe the file, not the model; dropped on load, re-created on save
_HF_BOOKKEEPING = ("transformers_version", "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype")
# options transformers has no model for: a config.json using them says model_type "moonlet" (so transformers
# refuses it with a clear error instead of loading half the weights) and keeps the family in `moonlet_base_model_type`
MOONLET_MODEL_TYPE = "moonlet"
_DSA_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")
_MHC_FIELDS = ("hc_mult", "hc_sinkhorn_iters", "hc_eps", "hc_gate_init")
_ENGRAM_FIELDS = ("engram_layers", "engram_max_ngram", "engram_heads_per_order", "engram_dim_per_order",
                  "engram_table_size", "engram_kernel_size", "engram_seed", "engram_compress")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # per routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # unused by MLA (one latent for all heads); written as num_attention_heads
    # MLA
    q_lora_rank: int | None = 1536  # None (or 0 in DeepSeek's own configs): plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # MoE
    n_routed_experts: int | None = 256  # None: a dense model (every layer SwiGLU)
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # MTP
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # DeepSeek checkpoints store rope rows as interleaved pairs
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    # DSA, DeepSeek Sparse Attention (model_type "deepseek_v32"; transformers' DeepseekV32Config names).
    # None = transformers' defaults (64 / 128 / 2048) for a deepseek_v32 model, unused otherwise.
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    # mHC, manifold-constrained hyper-connections (moonlet-only; DeepSeek-V4 names): None = plain residual
    hc_mult: int | None = None  # residual streams n
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6  # Sinkhorn: floor of the sums it divides by
    hc_gate_init: float = 0.01  # alpha (gating factor) of the dynamic part, as in the mHC paper
    # Engram, hashed n-gram memory (moonlet-only): None = off; 0-based layer ids it is inserted before
    engram_layers: list[int] | None = None
    engram_max_ngram: int = 3  # orders 2..N
    engram_heads_per_order: int = 8
    engram_dim_per_order: int = 512  # split over the heads: row width = dim_per_order / heads
    engram_table_size: list[int] | int | None = None  # rows per head for each order (first prime >= this); None: 5 x vocab
    engram_kernel_size: int = 4
    engram_seed: int = 0
    engram_compress: bool = False  # hash tokenizer-compressed ids (map stored in the checkpoint)
    # bookkeeping (not model shape)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, written back
    rope_spelling: str = field(default="rope_scaling", repr=False)  # "rope_scaling" | "rope_parameters"

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:  # DeepSeek's V2-Lite config spells "no q LoRA" as 0
            self.q_lora_rank = None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if rope_type in (None, "default"):
                self.rope_scaling = None
        if self.model_type == "deepseek_v32":  # transformers' DeepseekV32Config defaults
            self.index_n_heads = 64 if self.index_n_heads is None else self.index_n_heads
            self.index_head_dim = 128 if self.index_head_dim is None else self.index_head_dim
            self.index_topk = 2048 if self.index_topk is None else self.index_topk
        if isinstance(self.engram_layers, tuple):
            self.engram_layers = list(self.engram_layers)
        if isinstance(self.engram_table_size, tuple):
            self.engram_table_size = list(self.engram_table_size)

    # ---- derived --------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which layers are MoE: from `first_k_dense_replace` on, every `moe_layer_freq`-th."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict[str, Any] | None:
        """Normalized YaRN parameters, or None when RoPE is unscaled."""
        if self.rope_scaling is None:
            return None
        rs = self.rope_scaling
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(
                rs.get("original_max_position_embeddings", self.max_position_embeddings)
            ),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": rs.get("mscale"),
            "mscale_all_dim": rs.get("mscale_all_dim"),
            "attention_factor": rs.get("attention_factor"),
            "truncate": rs.get("truncate", True),
        }

    @property
    def is_dsa(self) -> bool:
        """DeepSeek Sparse Attention (lightning indexer + top-k) in every attention layer."""
        return self.model_type == "deepseek_v32"

    def is_engram_layer(self, layer_idx: int) -> bool:
        return self.engram_layers is not None and layer_idx in self.engram_layers

    @property
    def engram_table_sizes(self) -> list[int]:
        """Requested rows per head for orders 2..N (each head's table is the next unused prime)."""
        n = self.engram_max_ngram - 1
        if self.engram_table_size is None:
            return [5 * self.vocab_size] * n
        if isinstance(self.engram_table_size, int):
            return [self.engram_table_size] * n
        return list(self.engram_table_size)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first field that makes the model impossible."""
        ints_pos = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                    "max_position_embeddings", "moe_layer_freq"]
        for name in ints_pos:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("first_k_dense_replace", "num_nextn_predict_layers"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.q_lora_rank is not None:
            _check_int("q_lora_rank", self.q_lora_rank, minimum=1)
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias", "rope_interleave"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', SwiGLU)")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not one moonlet reads; expected one of {MODEL_TYPES}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) cannot exceed num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        if self.is_moe:
            E = self.n_routed_experts
            _check_int("n_routed_experts", E, minimum=1)
            _check_int("num_experts_per_tok", self.num_experts_per_tok, minimum=1)
            _check_int("moe_intermediate_size", self.moe_intermediate_size, minimum=1)
            _check_int("n_shared_experts", self.n_shared_experts or 0, minimum=0)
            if self.num_experts_per_tok > E:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed n_routed_experts ({E})"
                )
            if self.scoring_func not in SCORING_FUNCS:
                raise ConfigError(f"scoring_func {self.scoring_func!r} must be one of {SCORING_FUNCS}")
            if self.topk_method not in TOPK_METHODS:
                raise ConfigError(f"topk_method {self.topk_method!r} must be one of {TOPK_METHODS}")
            if (not isinstance(self.routed_scaling_factor, (int, float)) or isinstance(self.routed_scaling_factor, bool)
                    or self.routed_scaling_factor <= 0):
                raise ConfigError(f"routed_scaling_factor must be positive, got {self.routed_scaling_factor!r}")
            if self.topk_method in ("noaux_tc", "group_limited_greedy"):
                G, TG = self.n_group or 1, self.topk_group or 1
                _check_int("n_group", G, minimum=1)
                _check_int("topk_group", TG, minimum=1)
                if E % G:
                    raise ConfigError(f"n_routed_experts ({E}) must be divisible by n_group ({G})")
                if TG > G:
                    raise ConfigError(f"topk_group ({TG}) cannot exceed n_group ({G})")
                if self.topk_method == "noaux_tc" and E // G < 2:
                    raise ConfigError(
                        f"noaux_tc scores each group by the sum of its top-2 experts, so every group needs "
                        f">= 2 experts: n_routed_experts ({E}) / n_group ({G}) = {E // G}"
                    )
                if self.num_experts_per_tok > TG * (E // G):
                    raise ConfigError(
                        f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept "
                        f"groups: topk_group ({TG}) x experts per group ({E // G})"
                    )
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if rtype != "yarn":
                raise ConfigError(f"rope_scaling type {rtype!r} is not supported (only 'yarn' or none)")
            if "factor" not in self.rope_scaling:
                raise ConfigError("rope_scaling (yarn) needs a 'factor'")
            f = self.rope_scaling["factor"]
            if not isinstance(f, (int, float)) or f < 1:
                raise ConfigError(f"rope_scaling.factor must be a number >= 1, got {f!r}")
        self._validate_levers()
        return self

    def _validate_levers(self) -> None:
        """DSA, mHC and Engram fields (all off by default)."""
        dsa = _DSA_FIELDS
        if self.is_dsa:
            for name in dsa:
                _check_int(name, getattr(self, name), minimum=1)
            if self.q_lora_rank is None:
                raise ConfigError("DSA (model_type 'deepseek_v32') needs q_lora_rank: the indexer's queries are "
                                  "projected from the MLA query latent")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                                  f"({self.qk_rope_head_dim}): the indexer ropes its first qk_rope_head_dim dims")
        else:
            for name in dsa:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is set but model_type is {self.model_type!r}; DSA is the "
                                      f"'deepseek_v32' architecture: set model_type='deepseek_v32'")
        if self.hc_mult is not None:
            _check_int("hc_mult", self.hc_mult, minimum=1)
            _check_int("hc_sinkhorn_iters", self.hc_sinkhorn_iters, minimum=1)
            for name in ("hc_eps", "hc_gate_init"):
                v = getattr(self, name)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.engram_layers is not None:
            L = self.num_hidden_layers
            if not isinstance(self.engram_layers, list):
                raise ConfigError(f"engram_layers must be a list of layer ids, got {self.engram_layers!r}")
            if not self.engram_layers:
                raise ConfigError("engram_layers is empty; use null to switch Engram off")
            for i in self.engram_layers:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < L:
                    raise ConfigError(f"engram_layers holds {i!r}; layer ids are 0-based integers < "
                                      f"num_hidden_layers ({L})")
            if len(set(self.engram_layers)) != len(self.engram_layers):
                raise ConfigError(f"engram_layers {self.engram_layers} repeats a layer")
            _check_int("engram_max_ngram", self.engram_max_ngram, minimum=2)
            _check_int("engram_heads_per_order", self.engram_heads_per_order, minimum=1)
            _check_int("engram_dim_per_order", self.engram_dim_per_order, minimum=1)
            _check_int("engram_kernel_size", self.engram_kernel_size, minimum=1)
            _check_int("engram_seed", self.engram_seed, minimum=0)
            if self.engram_dim_per_order % self.engram_heads_per_order:
                raise ConfigError(f"engram_dim_per_order ({self.engram_dim_per_order}) must be divisible by "
                                  f"engram_heads_per_order ({self.engram_heads_per_order})")
            sizes = self.engram_table_size
            if sizes is not None and not isinstance(sizes, int):
                if not isinstance(sizes, list) or len(sizes) != self.engram_max_ngram - 1:
                    raise ConfigError(f"engram_table_size must be an integer or a list of "
                                      f"{self.engram_max_ngram - 1} integers (orders 2..{self.engram_max_ngram}), "
                                      f"got {sizes!r}")
            for v in self.engram_table_sizes:
                _check_int("engram_table_size", v, minimum=2)
            if not isinstance(self.engram_compress, bool):
                raise ConfigError(f"engram_compress must be true or false, got {self.engram_compress!r}")

    # ---- HF config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json` (hub or transformers-5 spelling), keeping unknown keys."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        if "text_config" in d and "hidden_size" not in d:  # multimodal wrappers (Kimi-K2.5): the LM part
            d = d["text_config"]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_spelling"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        spelling = "rope_scaling"
        rp = d.pop("rope_parameters", None)
        if rp is not None:
            spelling = "rope_parameters"
            if not isinstance(rp, dict):
                raise ConfigError(f"rope_parameters must be an object, got {rp!r}")
            rp = dict(rp)
            if "rope_theta" in rp:
                kwargs["rope_theta"] = rp.pop("rope_theta")
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default":
                kwargs["rope_scaling"] = rp  # keys kept as read ("rope_type", and "type" when present)
        if d.get("model_type") == MOONLET_MODEL_TYPE:
            d["model_type"] = d.pop("moonlet_base_model_type", "deepseek_v3")
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        for k, v in d.items():
            if k in _HF_BOOKKEEPING:
                continue
            if k in known:
                if k == "rope_scaling" and "rope_scaling" in kwargs:
                    continue
                kwargs[k] = v
            else:
                extra[k] = v
        if kwargs.get("model_type", "deepseek_v3") not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {kwargs['model_type']!r} is not one moonlet reads; expected one of {MODEL_TYPES}"
            )
        if kwargs.get("model_type") == "deepseek_v2":  # V2 spells its defaults differently
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("first_k_dense_replace", 0)
            kwargs.setdefault("num_nextn_predict_layers", 0)
            kwargs.setdefault("n_group", None)
            kwargs.setdefault("topk_group", None)
        for k in ("n_group", "topk_group"):
            if kwargs.get(k, 1) is None:
                kwargs[k] = 1
        cfg = cls(**kwargs)
        cfg.extra = extra
        cfg.rope_spelling = spelling
        return cfg.validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` object transformers' DeepseekV3 reads (Kimi-K2 is written as deepseek_v3)."""
        out: dict[str, Any] = {}
        off = (() if self.is_dsa else _DSA_FIELDS) + (() if self.hc_mult is not None else _MHC_FIELDS) + (
            () if self.engram_layers is not None else _ENGRAM_FIELDS)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_spelling", "rope_scaling", "rope_theta") or f.name in off:
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["num_key_value_heads"] = self.num_attention_heads  # MLA: every head reads the one latent
        out["model_type"] = "deepseek_v3" if self.model_type in ("kimi_k2", "deepseek_v3") else self.model_type
        out["architectures"] = [
            {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}.get(
                out["model_type"], "DeepseekV3ForCausalLM")
        ]
        if self.rope_spelling == "rope_parameters":
            rp: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
            if self.rope_scaling is not None:
                rp.update(copy.deepcopy(self.rope_scaling))
                rp["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "yarn"))
            out["rope_parameters"] = rp
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
            if self.rope_scaling is not None and "type" not in self.rope_scaling:  # hub-era readers need "type"
                out["rope_scaling"]["type"] = self.rope_scaling.get("rope_type", "yarn")
        for k, v in self.extra.items():
            out.setdefault(k, copy.deepcopy(v))
        if "qk_head_dim" in out:  # derived keys transformers 5 writes: keep them true to the fields
            out["qk_head_dim"] = self.qk_head_dim
        if "head_dim" in out:
            out["head_dim"] = self.qk_rope_head_dim
        if self.hc_mult is not None or self.engram_layers is not None:
            out["moonlet_base_model_type"] = out["model_type"]
            out["model_type"] = MOONLET_MODEL_TYPE
            out["architectures"] = ["MoonletForCausalLM"]
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a `config.json` file (or a directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"no config.json at {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except TypeError as e:  # e.g. a field with an object where a number belongs
            raise ConfigError(f"{p}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write `config.json` atomically (into a directory, or to the given file path)."""
        p = Path(path)
        if p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "config.json"
        atomic_write_text(p, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return p

    def replace(self, **changes: Any) -> "ModelConfig":
        new = dataclasses.replace(self, **changes)
        new.extra = copy.deepcopy(self.extra)
        return new.validate()


def _check_int(name: str, v: Any, minimum: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {v}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- presets ------------------------------------------------------------------------------------
def _tiny() -> ModelConfig:
    # a few M parameters: trains on 2 CPU cores in minutes; every architectural feature switched on
    return ModelConfig(
        vocab_size=4096, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _small() -> ModelConfig:
    # the benchmark config (bench/decode.py, bench/train.py): 85M total / 27.5M active
    return ModelConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
        num_hidden_layers=8, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, model_type="deepseek_v3",
    )


def _kimi_k2() -> ModelConfig:
    # Kimi-K2-Instruct (0711)
    return ModelConfig(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=131072, rope_theta=50000.0,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=163584, eos_token_id=163585, model_type="kimi_k2",
    )


PRESETS = {"tiny": _tiny, "small": _small, "deepseek-v3": _deepseek_v3, "kimi-k2": _kimi_k2}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]().validate()


def resolve_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A preset name, a config.json file, or a directory holding one."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return preset(name_or_path)
    p = Path(name_or_path)
    if p.exists():
        return ModelConfig.load(p)
    raise ConfigError(f"{str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
