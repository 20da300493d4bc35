"""Accounting of the levers (DSA, mHC, Engram) against hand-worked numbers on the `tiny` preset and a
model built on the meta device, and their rows in `moonlet info`.

tiny: D 192, 4 layers (1 dense + 3 MoE), 4 heads, q_lora 96, kv_lora 64, qk 32 + 16 (rope), v 32,
1 MTP depth, vocab 4096.
"""

import json

import pytest
import torch

from moonlet import accounting as acc
from moonlet.cli import main
from moonlet.config import preset
from moonlet.model import CausalLM

DSA = dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=64)
MHC = dict(hc_mult=4)
ENGRAM = dict(engram_layers=[1], engram_max_ngram=3, engram_heads_per_order=4, engram_dim_per_order=128,
              engram_table_size=5000)


def _cfg(**kw):
    return preset("tiny").replace(**kw)


def _meta_counts(cfg):
    with torch.device("meta"):
        model = CausalLM(cfg)
    main_n = sum(t.numel() for n, t in model.state_dict().items() if not n.startswith("mtp."))
    return main_n, sum(t.numel() for t in model.state_dict().values())


# ---- parameters -------------------------------------------------------------------------------------
def test_dsa_params_by_hand():
    # per layer: wq_b 96 x (4 x 32) = 12,288 + wk 192 x 32 = 6,144 + k_norm 2 x 32 = 64 + weights_proj 192 x 4 = 768
    base, dsa = acc.param_counts(_cfg()), acc.param_counts(_cfg(**DSA))
    assert dsa["dsa_indexers"] == 4 * 19_264 == 77_056 and dsa["dsa_indexers_mtp"] == 19_264
    assert dsa["total"] - base["total"] == 77_056 and dsa["active"] - base["active"] == 77_056
    assert dsa["mtp"] - base["mtp"] == 19_264


def test_mhc_params_by_hand():
    # per sublayer: fn [n^2 + 2n, nC] = 24 x 768 = 18,432 + base 24 + scale 3 = 18,459; 2 sublayers x 4 layers
    base, mhc = acc.param_counts(_cfg()), acc.param_counts(_cfg(**MHC))
    assert mhc["mhc"] == 8 * 18_459 == 147_672 and mhc["mhc_mtp"] == 2 * 18_459
    assert mhc["total"] - base["total"] == 147_672 and mhc["active"] - base["active"] == 147_672


def test_engram_params_by_hand():
    # 8 tables (2 orders x 4 heads), each the next unused prime >= 5000:
    # 5003 + 5009 + 5011 + 5021 + 5023 + 5039 + 5051 + 5059 = 40,216 rows of 128 / 4 = 32 values
    # dense: W_V (256 x 192 + 192) + W_K (256 x 192 + 192) + 3 norms x 192 + conv 192 x 4 = 100,032
    base, e = acc.param_counts(_cfg()), acc.param_counts(_cfg(**ENGRAM))
    assert e["engram_tables"] == 40_216 * 32 == 1_286_912
    assert e["engram_dense"] == 100_032 and e["engram_values_read_per_token"] == 256
    assert e["total"] - base["total"] == 1_286_912 + 100_032
    assert e["active"] - base["active"] == 100_032  # the tables are lookup-only


@pytest.mark.parametrize("kw", [DSA, MHC, ENGRAM, {**DSA, **MHC, **ENGRAM}], ids=["dsa", "mhc", "engram", "all"])
def test_lever_param_counts_match_meta_model(kw):
    cfg = _cfg(**kw)
    pc = acc.param_counts(cfg)
    assert (pc["total"], pc["total_with_mtp"]) == _meta_counts(cfg)


# ---- cache bytes ---------------------------------------------------------------------------------------
def test_cache_bytes_by_hand():
    # MLA latent (64 + 16) x 4 layers x 2 B = 640; DSA index key 32 x 4 layers x 2 B = 256;
    # Engram (one layer): int64 id 8 + (d_mem 256 + gates M) x 2 B: M = 1 -> 522, with mHC M = 4 -> 528
    assert acc.kv_cache_bytes_per_token(_cfg(), 2) == 640
    assert acc.kv_cache_bytes_per_token(_cfg(**DSA), 2) == 640 + 256
    assert acc.kv_cache_bytes_per_token(_cfg(**ENGRAM), 2) == 640 + 522
    b = acc.kv_cache_bytes_per_token(_cfg(**DSA, **MHC, **ENGRAM), 2, breakdown=True)
    assert b == {"attention": 640, "dsa_index_keys": 256, "engram_state": 528, "total": 1424}
    assert acc.kv_cache_bytes_per_token(_cfg(**DSA), 2, include_mtp=True) == 5 * 80 * 2 + 5 * 32 * 2


def test_cache_bytes_match_allocate_cache():
    """What allocate_cache really holds per token slot (fp32 -> 4 B per value, ids int64)."""
    from moonlet.model import allocate_cache

    cfg = _cfg(**DSA, **MHC, **ENGRAM)
    caches = allocate_cache(cfg, batch=1, max_seq=10, dtype=torch.float32, mtp=False)
    held = sum(t.numel() * t.element_size() for c in caches for t in vars(c).values() if t is not None)
    assert held / 10 == acc.kv_cache_bytes_per_token(cfg, 4)


# ---- FLOPs -----------------------------------------------------------------------------------------------
def test_dsa_flops_by_hand():
    base = acc.flops_per_token(_cfg(), 256, training=False, breakdown=True)
    dsa = acc.flops_per_token(_cfg(**DSA), 256, training=False, breakdown=True)
    # keys attended, mean over a 256-token causal row with top-64: (64 x 65 / 2 + 192 x 64) / 256 = 56.125
    # attention quadratic per layer: 2 x 4 heads x (48 + 32) x keys
    assert base["attention_quadratic"] == 4 * 640 * 128.5
    assert dsa["attention_quadratic"] == 4 * 640 * 56.125
    # indexer per layer at the mean context 128.5: 2 x (12,288 + 6,144 + 768) + 2 x 4 x 32 x 128.5 + 2 x 4 x 128.5
    assert dsa["dsa_indexer"] == 4 * 72_324
    assert dsa["total"] - base["total"] == 4 * (72_324 + 640 * (56.125 - 128.5))
    tr = acc.flops_per_token(_cfg(**DSA), 256, training=True, breakdown=True)
    # KL target (forward only): q_nope -> latent 2 x 4 x 32 x 64 + scores 2 x 4 x 80 x 128.5, per layer
    assert tr["dsa_kl_target"] == 4 * (16_384 + 82_240)
    assert tr["total"] == pytest.approx(3 * dsa["total"] + 4 * 98_624)


def test_mhc_and_engram_flops_by_hand():
    base = acc.flops_per_token(_cfg(), 256, training=False)
    m = acc.flops_per_token(_cfg(**MHC), 256, training=False, breakdown=True)
    # per sublayer: 2nC(n^2 + 2n) 36,864 + read 2nC 1,536 + mix 2n^2C 6,144 + write 2nC 1,536 = 46,080
    assert m["mhc"] == 8 * 46_080 and m["total"] - base == 8 * 46_080
    e = acc.flops_per_token(_cfg(**ENGRAM), 256, training=False, breakdown=True)
    # W_V and one W_K: 2 x 256 x 192 x (1 + 1)
    assert e["engram"] == 196_608 and e["total"] - base == 196_608


def test_no_lever_numbers_unchanged():
    """The published DeepSeek-V3 figures stay as they were (the lever terms are all zero)."""
    cfg = preset("deepseek-v3")
    assert acc.kv_cache_bytes_per_token(cfg, 2) == 70_272
    parts = acc.flops_per_token(cfg, 4096, training=True, breakdown=True)
    assert parts["dsa_indexer"] == parts["mhc"] == parts["engram"] == parts["dsa_kl_target"] == 0
    assert acc.param_counts(cfg)["total"] == 671_026_419_200


# ---- moonlet info ---------------------------------------------------------------------------------------
def test_info_shows_the_levers(tmp_path, capsys):
    _cfg(**DSA, **MHC, **ENGRAM).save(tmp_path)
    assert main(["info", str(tmp_path), "--json", "--seq-len", "256"]) == 0
    d = json.loads(capsys.readouterr().out)
    lev = d["levers"]
    assert lev["dsa"]["indexer_params"] == 77_056 and lev["dsa"]["mean_attended_keys"] == 56.125
    assert lev["mhc"]["params"] == 147_672
    assert lev["engram"]["table_params"] == 1_286_912 and lev["engram"]["values_read_per_token"] == 256
    assert d["kv_cache_bytes_per_token"] == 1424
    assert main(["info", str(tmp_path), "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    for needle in ("DSA indexers", "77,056 params", "56.1 of 128.5", "mHC", "147,672 params", "Engram tables",
                   "1,286,912 params", "host-memory", "DSA index keys 256 B", "Engram state 528 B"):
        assert needle in out, needle
    assert main(["info", "tiny"]) == 0
    assert "levers" not in capsys.readouterr().out
