"""config.json: hub and transformers-5 spellings round trip; Kimi-K2 reads and writes as deepseek_v3;
every validation error names its field."""

from __future__ import annotations

import copy
import json

import pytest

from moonlet.config import ConfigError, ModelConfig, preset

AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# deepseek-ai/DeepSeek-V3 config.json as published (hub spelling: rope_scaling + rope_theta, torch_dtype)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": QUANT, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# moonshotai/Kimi-K2-Instruct config.json as published: model_type kimi_k2, DeepseekV3 architecture
KIMI_K2 = {
    **{k: v for k, v in DEEPSEEK_V3.items() if k != "ep_size"},
    "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "max_position_embeddings": 131072,
    "model_type": "kimi_k2", "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827, "topk_group": 1, "transformers_version": "4.48.3", "vocab_size": 163840,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
BOOKKEEPING = {"architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}


def _round_trip(d: dict) -> dict:
    return ModelConfig.from_hf_dict(copy.deepcopy(d)).to_hf_dict()


def test_hub_config_round_trip_keeps_every_key_and_spelling(tmp_path):
    out = _round_trip(DEEPSEEK_V3)
    for k, v in DEEPSEEK_V3.items():
        if k not in BOOKKEEPING:
            assert out[k] == v, k  # unknown keys (ep_size, pretraining_tp, quantization_config) kept
    assert "rope_parameters" not in out  # hub spelling written as read
    assert out["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in out  # no custom code
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3)
    plain = cfg.replace()
    plain.extra = {}
    assert plain == preset("deepseek-v3").replace(rope_theta=10000)  # the preset is the published config
    p = cfg.save(tmp_path)
    text = p.read_text()
    assert ModelConfig.load(tmp_path).save(tmp_path / "again.json").read_text() == text  # stable


def test_transformers5_config_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    hf.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    cfg = ModelConfig.load(tmp_path / "hf")
    assert cfg.yarn["factor"] == 4.0 and cfg.q_lora_rank is None
    assert cfg.rope_theta == written["rope_parameters"]["rope_theta"]
    out = cfg.to_hf_dict()
    for k, v in written.items():
        if k not in BOOKKEEPING and k != "num_key_value_heads":  # MLA: written as num_attention_heads
            assert out[k] == v, k  # incl. rope_parameters exactly as transformers spelled it
    assert out["scoring_func"] == "sigmoid" and out["topk_method"] == "noaux_tc"  # llama.cpp reads these
    cfg.save(tmp_path / "moon")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "moon")
    mine, theirs = back.to_dict(), hf.to_dict()
    for k in theirs:
        if k not in BOOKKEEPING | {"num_key_value_heads"}:
            assert mine[k] == theirs[k], k


def test_kimi_k2_reads_as_kimi_and_writes_as_deepseek_v3(tmp_path):
    cfg = ModelConfig.from_hf_dict(KIMI_K2)
    assert cfg.model_type == "kimi_k2" and cfg.n_routed_experts == 384 and cfg.yarn["factor"] == 32.0
    assert cfg.yarn["beta_fast"] == 1.0 and cfg.num_nextn_predict_layers == 0
    want = preset("kimi-k2")
    for f in ("vocab_size", "hidden_size", "num_attention_heads", "n_routed_experts", "routed_scaling_factor",
              "rope_theta", "first_k_dense_replace", "n_group", "topk_group", "max_position_embeddings"):
        assert getattr(cfg, f) == getattr(want, f), f
    out = cfg.to_hf_dict()
    assert out["model_type"] == "deepseek_v3" and out["architectures"] == ["DeepseekV3ForCausalLM"]
    transformers = pytest.importorskip("transformers")
    cfg.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DeepseekV3Config" and hf.n_routed_experts == 384
    assert hf.rope_parameters["factor"] == 32.0 and hf.rope_parameters["rope_theta"] == 50000.0


def test_deepseek_v2_lite_defaults():
    d = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
         "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "q_lora_rank": None,
         "kv_lora_rank": 512, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
         "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
         "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.q_lora_rank is None and cfg.scoring_func == "softmax" and cfg.num_nextn_predict_layers == 0
    assert ModelConfig.from_hf_dict({**d, "q_lora_rank": 0}).q_lora_rank is None  # DeepSeek's own spelling
    assert cfg.to_hf_dict()["architectures"] == ["DeepseekV2ForCausalLM"]


TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 8, "n_group": 2,
        "topk_group": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1}

BAD = [
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts (10) must be divisible by n_group (4)"),
    ({"topk_group": 3}, "topk_group (3) cannot exceed n_group (2)"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) cannot exceed n_routed_experts (8)"),
    ({"num_experts_per_tok": 5},
     "num_experts_per_tok (5) exceeds the experts in the kept groups: topk_group (1) x experts per group (4)"),
    ({"n_group": 8, "topk_group": 4}, "every group needs >= 2 experts: n_routed_experts (8) / n_group (8) = 1"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim (5) must be even"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"scoring_func": "tanh"}, "scoring_func 'tanh' must be one of"),
    ({"topk_method": "top1"}, "topk_method 'top1' must be one of"),
    ({"first_k_dense_replace": 3}, "first_k_dense_replace (3) cannot exceed num_hidden_layers (2)"),
    ({"hidden_size": "32"}, "hidden_size must be an integer, got '32'"),
    ({"num_attention_heads": 2.0}, "num_attention_heads must be an integer, got 2.0"),
    ({"kv_lora_rank": 0}, "kv_lora_rank must be >= 1, got 0"),
    ({"q_lora_rank": -3}, "q_lora_rank must be >= 1, got -3"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, got 'yes'"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false, got 1"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number, got -1"),
    ({"routed_scaling_factor": True}, "routed_scaling_factor must be positive, got True"),
    ({"model_type": "llama"}, "model_type 'llama' is not one moonlet reads"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null, got 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling (yarn) needs a 'factor'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor must be a number >= 1, got 0.5"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be an object, got [1, 2]"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_validation_names_the_field(tmp_path, change, message):
    ModelConfig.from_hf_dict(TINY)  # the base is valid
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **change}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.load(tmp_path)
    assert message in str(e.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON: .*line 1"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json must hold a JSON object, got list"):
        ModelConfig.load(tmp_path)
