"""Accounting against published figures, a meta-device model, and torch's FLOP counter."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moonlet import accounting as acc
from moonlet.cli import main
from moonlet.config import ModelConfig, preset
from moonlet.model import CausalLM


def meta_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(main model, with MTP) element counts of every distinct tensor of the state dict, on meta."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    seen, main_n, all_n = set(), 0, 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied head is one tensor
            continue
        seen.add(id(t))
        all_n += t.numel()
        if not name.startswith("mtp."):
            main_n += t.numel()
    return main_n, all_n


# ---- published figures (spec 5.1, 2.3, 2.4, 5.2) ------------------------------------------------
def test_deepseek_v3_published_figures():
    cfg = preset("deepseek-v3")
    pc = acc.param_counts(cfg)
    assert pc["total"] == 671_026_419_200
    assert round(pc["active"] / 1e9, 2) == 37.55  # spec 5.1: 37.55B incl. embedding + head ("37B")
    assert round(pc["active_excl_embedding"] / 1e9, 2) == 36.63
    assert acc.kv_cache_bytes_per_token(cfg, 2, "latent") == 70_272 == 61 * 576 * 2
    assert acc.kv_cache_bytes_per_token(cfg, 2, "naive") == 61 * 128 * 320 * 2
    assert round(acc.softmax_scale(cfg), 6) == 0.135234
    assert acc.yarn_ramp(cfg) == (10, 23)
    # ISCA '25 Table 2: 250 GFLOPs per training token at 4K (no MTP, causal attention)
    f = acc.flops_per_token(cfg, 4096, training=True)
    assert abs(f / 250e9 - 1) < 0.05, f
    assert acc.weight_bytes(cfg, "fp8") == 671_026_419_200
    assert acc.weight_bytes(cfg, "int4") == 671_026_419_200 / 2


def test_kimi_k2_published_figures():
    cfg = preset("kimi-k2")
    pc = acc.param_counts(cfg)
    assert pc["total"] == 1_026_408_232_448
    assert round(pc["active"] / 1e9, 2) == 32.86
    assert round(pc["active_excl_embedding"] / 1e9, 2) == 31.69
    assert acc.kv_cache_bytes_per_token(cfg) == 70_272  # the latent does not depend on the head count
    assert round(acc.softmax_scale(cfg), 6) == 0.130861
    assert acc.yarn_ramp(cfg) == (19, 20)


# ---- the formulas against a model built on the meta device ---------------------------------------
VARIANTS = {
    "v3": lambda: preset("deepseek-v3"),
    "k2": lambda: preset("kimi-k2"),
    "tiny": lambda: preset("tiny"),
    "plain_q_bias_tied": lambda: preset("tiny").replace(q_lora_rank=None, attention_bias=True,
                                                        tie_word_embeddings=True, num_nextn_predict_layers=2),
    "dense": lambda: preset("tiny").replace(n_routed_experts=None, num_nextn_predict_layers=1),
    "greedy_freq2": lambda: preset("tiny").replace(topk_method="greedy", scoring_func="softmax",
                                                   moe_layer_freq=2, first_k_dense_replace=0),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_param_counts_match_meta_model(name):
    cfg = VARIANTS[name]()
    pc = acc.param_counts(cfg)
    main_n, all_n = meta_counts(cfg)
    assert pc["total"] == main_n
    assert pc["total_with_mtp"] == all_n


def test_active_params_from_modules():
    """active = total minus the (E - K) routed experts a token skips in every MoE layer."""
    cfg = preset("small")
    with torch.device("meta"):
        model = CausalLM(cfg)
    skipped = sum(m.experts.gate_proj.numel() + m.experts.up_proj.numel() + m.experts.down_proj.numel()
                  for m in model.model.modules() if hasattr(m, "experts"))
    skipped = skipped * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    pc = acc.param_counts(cfg)
    assert pc["active"] == pc["total"] - skipped
    assert pc["active_excl_embedding"] == pc["active"] - model.model.embed_tokens.weight.numel()


# ---- FLOPs against torch's FLOP counter on a real forward/backward ------------------------------
def _count_grouped_mm() -> None:
    """torch's counter has no formula for grouped_mm (the MoE's expert GEMMs): each row of the output
    is one token's product, so FLOPs = 2 x rows x cols of the per-token output x the reduction length."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.aten._grouped_mm in flop_registry:
        return

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        per_row = out_shape[-2] * out_shape[-1] if len(out_shape) == 3 else out_shape[-1]
        rows = 1 if len(out_shape) == 3 else out_shape[0]
        return 2 * rows * per_row * a_shape[-1]


def test_flops_match_torch_flop_counter():
    _count_grouped_mm()
    cfg = preset("tiny").replace(num_nextn_predict_layers=1)
    model = CausalLM(cfg).init_weights(seed=0)
    B, T = 2, 24
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    parts = acc.flops_per_token(cfg, T, training=False, breakdown=True)
    # the counter charges attention for the full T x T score matrix whatever the mask; the formula
    # charges the causal mean (T + 1) / 2 keys per query, so rescale that one term for the comparison
    full_attn = parts["attention_quadratic"] * T / acc.mean_causal_context(T)
    expected_fwd = parts["total"] - parts["attention_quadratic"] + full_attn
    with FlopCounterMode(display=False) as fc:
        model(ids, run_mtp=False)
    assert fc.get_total_flops() == pytest.approx(expected_fwd * B * T, rel=1e-9)
    with FlopCounterMode(display=False) as fc:
        model(ids, labels=ids, run_mtp=False).loss.backward()
    assert fc.get_total_flops() == pytest.approx(3 * expected_fwd * B * T, rel=1e-9)


def test_flops_conventions():
    cfg = preset("deepseek-v3")
    fwd = acc.flops_per_token(cfg, 4096, training=False)
    assert acc.flops_per_token(cfg, 4096, training=True) == pytest.approx(3 * fwd)
    # matmul weights dominate: 2 x active params excluding the embedding lookup, plus attention
    pc = acc.param_counts(cfg)
    assert acc.flops_per_token(cfg, 1, training=False) == pytest.approx(2 * pc["active_excl_embedding"], rel=2e-3)
    assert acc.flops_per_token(cfg, 4096, True, include_mtp=True) > acc.flops_per_token(cfg, 4096, True)
    # the absorbed form does more attention work per token (576/512-wide latent per head) at long context
    assert acc.flops_per_token(cfg, 32768, False, form="absorbed") > acc.flops_per_token(cfg, 32768, False)
    with pytest.raises(ValueError, match="seq_len"):
        acc.flops_per_token(cfg, 0, training=True)


def test_dtype_bytes():
    assert acc.kv_cache_bytes_per_token(preset("deepseek-v3"), "fp8") == 35_136
    assert acc.kv_cache_bytes_per_token(preset("deepseek-v3"), 4, "naive") == 61 * 128 * 320 * 4
    with pytest.raises(ValueError, match="unknown dtype"):
        acc.weight_bytes(preset("tiny"), "fp7")
    with pytest.raises(ValueError, match="form"):
        acc.kv_cache_bytes_per_token(preset("tiny"), 2, "paged")


# ---- moonlet info --------------------------------------------------------------------------------
def test_info_json(capsys):
    assert main(["info", "deepseek-v3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_params"] == 671_026_419_200
    assert d["kv_cache_bytes_per_token"] == 70_272
    assert round(d["softmax_scale"], 6) == 0.135234
    assert round(d["active_params"] / 1e9, 2) == 37.55
    assert d["yarn_ramp"] == [10, 23]


def test_info_table_and_config_file(tmp_path, capsys):
    preset("kimi-k2").save(tmp_path)  # a config.json in a directory
    assert main(["info", str(tmp_path), "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "1,026,408,232,448" in out and "70,272 B" in out and "0.130861" in out and "(19, 20)" in out
    assert main(["info", str(tmp_path / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 1_026_408_232_448


@pytest.mark.parametrize("content,needle", [
    ('{"hidden_size": 64, "n_routed_experts": 10, "n_group": 4}', "n_routed_experts (10) must be divisible by n_group (4)"),
    ('{"hidden_size": "big"}', "hidden_size must be an integer"),
    ('{"hidden_size": 64,', "not valid JSON"),
])
def test_info_bad_input(tmp_path, capsys, content, needle):
    p = tmp_path / "config.json"
    p.write_text(content)
    assert main(["info", str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_info_missing_path_subprocess():
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "moonlet", "info", "/no/such/dir"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode != 0 and "neither a preset" in r.stderr and "Traceback" not in r.stderr
