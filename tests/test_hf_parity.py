"""Logit parity with transformers on the same random weights, through checkpoint files, both ways.

import: a random transformers model is saved with its own `save_pretrained`; moonlet loads the
        directory and must give the same logits.
export: a random moonlet model is saved with moonlet's `save_pretrained`; transformers'
        AutoModelForCausalLM loads it (no custom code) and must give the same logits.
Max |logit difference| <= 1e-4 in float32 over a batch of 2 x 64 tokens. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)

import moonlet
from moonlet.config import ModelConfig

logging.getLogger("transformers").setLevel(logging.ERROR)  # unexpected MTP keys etc. are expected here

B, T, TOL = 2, 64, 1e-4
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              max_position_embeddings=128,
              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)

V3_CONFIGS = {
    # groups (topk_group < n_group), a dense first layer, YaRN, q LoRA, normalized top-k, bias
    "groups_yarn_dense": dict(num_hidden_layers=3, q_lora_rank=32, n_routed_experts=16, n_shared_experts=1,
                              num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                              norm_topk_prob=True, routed_scaling_factor=2.5, rope_scaling=YARN),
    # plain q projection, norm_topk_prob false, no groups, no dense layer, unscaled RoPE
    "no_qlora_unnormalized": dict(num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, n_shared_experts=1,
                                  num_experts_per_tok=3, n_group=1, topk_group=1, first_k_dense_replace=0,
                                  norm_topk_prob=False, routed_scaling_factor=1.5, rope_scaling=None),
    # two dense layers, YaRN with other mscale / betas, tied embeddings, no q LoRA
    "tied_two_dense": dict(num_hidden_layers=3, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=2,
                           norm_topk_prob=True, routed_scaling_factor=1.0, tie_word_embeddings=True,
                           rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                                         "beta_fast": 16, "beta_slow": 2, "mscale": 0.707,
                                         "mscale_all_dim": 0.707}),
}
V2_CONFIGS = {
    # DeepSeek-V2-Lite style: softmax, greedy top-k, no q LoRA, two shared experts
    "v2_lite_greedy": dict(num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                           num_experts_per_tok=3, topk_method="greedy", first_k_dense_replace=1,
                           routed_scaling_factor=1.0, rope_scaling=None),
    # DeepSeek-V2 style: group-limited greedy (max per group), q LoRA, YaRN, scaling != 1
    "v2_group_limited": dict(num_hidden_layers=2, q_lora_rank=32, n_routed_experts=16, n_shared_experts=1,
                             num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             first_k_dense_replace=1, routed_scaling_factor=16.0, rope_scaling=YARN),
}


def _randomize(named: dict[str, torch.Tensor], seed: int) -> None:
    """Every tensor random (norm gains near 1, a correction bias big enough to change the selection)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named.items():
            if name.endswith("inv_freq"):
                continue
            r = torch.randn(t.shape, generator=g)
            if "norm" in name:
                t.copy_(1 + 0.2 * r)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * r)
            else:
                t.copy_(0.08 * r)


def _hf_model(kind: str, fields: dict, seed: int):
    fields = {**COMMON, **fields}
    if kind == "v3":
        cfg = DeepseekV3Config(**fields, attn_implementation="eager")
        model = DeepseekV3ForCausalLM(cfg)
    else:
        cfg = DeepseekV2Config(**fields, attn_implementation="eager")
        model = DeepseekV2ForCausalLM(cfg)
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    _randomize(named, seed)
    return model.eval()


def _ids(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (B, T, COMMON["vocab_size"])
    return (a.float() - b.float()).abs().max().item()


CASES = [("v3", n, f) for n, f in V3_CONFIGS.items()] + [("v2", n, f) for n, f in V2_CONFIGS.items()]


@pytest.mark.parametrize("kind,name,fields", CASES, ids=[c[1] for c in CASES])
def test_import_transformers_checkpoint(tmp_path, kind, name, fields):
    hf = _hf_model(kind, fields, seed=1)
    hf.save_pretrained(tmp_path)
    ids = _ids(COMMON["vocab_size"], 2)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        # transformers saves no MTP layer (its V3 config says 1 depth): moonlet loads without it and warns
        with pytest.warns(UserWarning, match="loading without MTP") if kind == "v3" else nullcontext():
            model = moonlet.from_pretrained(tmp_path)
        assert model.config.num_nextn_predict_layers == 0
        assert model.config.model_type == ("deepseek_v3" if kind == "v3" else "deepseek_v2")
        out = model(ids).logits
        out_absorbed = model(ids, absorbed=True).logits
    assert _max_diff(out, ref) <= TOL
    assert _max_diff(out_absorbed, ref) <= TOL
    if kind == "v3" and fields.get("n_group", 1) > 1:  # the bias must matter in this config, or the test is weak
        with torch.no_grad():
            for m in model.moe_layers():
                m.gate.e_score_correction_bias.zero_()
            assert _max_diff(model(ids).logits, ref) > 1e-3


def _moonlet_model(kind: str, fields: dict, seed: int) -> moonlet.CausalLM:
    f = {**COMMON, **fields, "num_nextn_predict_layers": 1 if kind == "v3" else 0}
    if kind == "v2":
        f.update(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False)
        f.setdefault("n_group", 1)
        f.setdefault("topk_group", 1)
    cfg = ModelConfig(**f).validate()
    model = moonlet.CausalLM(cfg)
    _randomize(dict(model.state_dict()), seed)
    return model.eval()


@pytest.mark.parametrize("kind,name,fields", CASES, ids=[c[1] for c in CASES])
def test_export_loads_in_transformers(tmp_path, kind, name, fields):
    model = _moonlet_model(kind, fields, seed=3)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["scoring_func"] == model.config.scoring_func  # llama.cpp needs both (spec appendix)
    assert written["topk_method"] == model.config.topk_method
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if kind == "v3" else "DeepseekV2ForCausalLM")
    ids = _ids(COMMON["vocab_size"], 4)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        out = model(ids).logits
    assert _max_diff(out, ref) <= TOL
