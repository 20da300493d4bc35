"""DSA (DeepSeek-V3.2 sparse attention): parity with transformers' DeepseekV32ForCausalLM, dense
equivalence when index_topk covers the sequence, cache/decode consistency, and the indexer loss."""

import json

import pytest
import torch

from moonlet.config import ModelConfig, preset
from moonlet.interop.hf import from_pretrained, save_pretrained
from moonlet.model import CausalLM
from moonlet.model.block import allocate_cache
from moonlet.model.sparse_attention import (
    dsa_extra_params, freeze_all_but_indexer, indexer_kl_loss, indexer_parameters, select_topk, set_dsa_stage,
)

transformers = pytest.importorskip("transformers")

HF_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
               n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
               routed_scaling_factor=1.5, index_n_heads=8, index_head_dim=16, index_topk=8,
               num_nextn_predict_layers=0, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}


def _dsa_tiny(**changes) -> ModelConfig:
    kw = dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=8)
    return preset("tiny").replace(**{**kw, **changes})


def _hf_model(rope_parameters=None, seed=0):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    kw = dict(HF_TINY)
    if rope_parameters is not None:
        kw["rope_parameters"] = rope_parameters
    torch.manual_seed(seed)
    hf = DeepseekV32ForCausalLM(DeepseekV32Config(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():  # every tensor non-trivial (LayerNorm bias, correction bias, norm gains)
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.03))
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return hf


@pytest.mark.parametrize("rope", [None, YARN], ids=["rope", "yarn"])
def test_logits_match_transformers_deepseek_v32(tmp_path, rope):
    """HF-saved V3.2 checkpoint -> moonlet: same logits (T=40 > index_topk=8) in both attention forms."""
    hf = _hf_model(rope)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, HF_TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        m = from_pretrained(tmp_path / "hf")
        assert m.config.is_dsa and m.config.index_topk == 8
        naive = m(ids).logits
        absorbed = m(ids, absorbed=True).logits
        set_dsa_stage(m, "dense")
        dense = m(ids).logits
    assert (naive - ref).abs().max().item() <= 1e-4
    assert (absorbed - ref).abs().max().item() <= 1e-4
    assert (dense - ref).abs().max().item() > 1e-3  # the selection really changes the output


def test_moonlet_dsa_checkpoint_loads_in_transformers(tmp_path):
    """moonlet -> config.json + safetensors that DeepseekV32ForCausalLM loads with no missing weights."""
    from transformers import AutoModelForCausalLM
    cfg = _dsa_tiny(num_nextn_predict_layers=0)
    m = CausalLM(cfg).init_weights(seed=3, std=0.05).eval()
    save_pretrained(m, tmp_path / "ml")
    d = json.loads((tmp_path / "ml" / "config.json").read_text())
    assert d["model_type"] == "deepseek_v32" and d["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (d["index_n_heads"], d["index_head_dim"], d["index_topk"]) == (4, 32, 8)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ml", output_loading_info=True,
                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, cfg.vocab_size, (1, 33))
    with torch.no_grad():
        assert (hf.eval()(ids).logits - m(ids).logits).abs().max().item() <= 1e-4
    # and back: config and weights round-trip exactly
    m2 = from_pretrained(tmp_path / "ml")
    assert m2.config.to_hf_dict() == cfg.to_hf_dict()
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_topk_covering_the_sequence_is_dense_mla_exactly():
    """index_topk >= T: the DSA model equals the V3 model with the same (non-indexer) weights, bit for bit
    (cache-free absorbed form: to rounding, since V3 folds W_UK/W_UV into its projections there)."""
    cfg = _dsa_tiny(index_topk=64)
    m = CausalLM(cfg).init_weights(seed=2, std=0.05).eval()
    base_cfg = cfg.replace(model_type="deepseek_v3", index_n_heads=None, index_head_dim=None, index_topk=None)
    base = CausalLM(base_cfg).eval()
    sd = {k: v for k, v in m.state_dict().items() if ".indexer." not in k}
    base.load_state_dict(sd)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        assert torch.equal(m(ids, absorbed=False).logits, base(ids, absorbed=False).logits)
        torch.testing.assert_close(m(ids, absorbed=True).logits, base(ids, absorbed=True).logits, rtol=0, atol=1e-5)
        cache_a, cache_b = allocate_cache(cfg, 2, 64), allocate_cache(base_cfg, 2, 64)
        pos = torch.arange(48).expand(2, 48)
        assert torch.equal(m(ids, positions=pos, cache=cache_a).logits, base(ids, positions=pos, cache=cache_b).logits)


@pytest.mark.parametrize("absorbed", [True, False])
def test_cached_decode_equals_full_forward(absorbed):
    """Prefill 6 tokens, then token by token to 40 (k = 8): the indexer key cache + top-k decode
    reproduce the full sparse forward."""
    cfg = _dsa_tiny()
    m = CausalLM(cfg).init_weights(seed=1, std=0.05).eval()
    B, T, P = 2, 40, 6
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    cache = allocate_cache(cfg, B, 48)
    with torch.no_grad():
        full = m(ids).logits
        steps = [m(ids[:, :P], positions=torch.arange(P).expand(B, P), cache=cache, absorbed=absorbed).logits]
        for t in range(P, T):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache, absorbed=absorbed).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    # the indexer cache holds exactly the keys the full forward computes
    attn = m.model.layers[1].self_attn
    ctx_keys = cache[1].index_keys[:, :T]
    with torch.no_grad():
        from moonlet.model.transformer import make_context
        ctx = make_context(m.model.rotary, torch.arange(T).expand(B, T), torch.float32, False, False)
        h = m.model.embed_tokens(ids)
        h, _ = m.model.layers[0](h, ctx)
        keys = attn.indexer.keys(m.model.layers[1].input_layernorm(h), ctx)
    assert (ctx_keys - keys).abs().max().item() <= 1e-5


def test_ragged_batch_with_short_rows():
    """A row with fewer visible keys than k next to a long row: the short row's top-k holds masked
    (future/padding) slots, which the second mask removes."""
    cfg = _dsa_tiny()
    m = CausalLM(cfg).init_weights(seed=4, std=0.05).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 20))
    b = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = m(a).logits[:, -1], m(b).logits[:, -1]
        cache = allocate_cache(cfg, 2, 24)
        ids = torch.zeros(2, 19, dtype=torch.long)
        ids[0], ids[1, :4] = a[0, :19], b[0, :4]
        m(ids, positions=torch.arange(19).expand(2, 19), cache=cache)
        out = m(torch.stack([a[0, 19], b[0, 4]])[:, None], positions=torch.tensor([[19], [4]]), cache=cache).logits
    assert (out[0, -1] - ref_a[0]).abs().max() <= 1e-5
    assert (out[1, -1] - ref_b[0]).abs().max() <= 1e-5


def test_select_topk_ties_go_to_lowest_index():
    s = torch.tensor([[[0.5, 0.0, 0.0, 0.9, 0.0, float("-inf")]]])
    assert select_topk(s, 3).int().tolist() == [[[1, 1, 0, 1, 0, 0]]]
    assert select_topk(s, 9).all()  # k > L: everything
    # decoupled from the shape it is computed in (topk alone is not)
    big = torch.zeros(1, 7, 300)
    big[..., ::7] = 1.0
    sel = select_topk(big, 50)
    assert sel.sum(-1).eq(50).all() and torch.equal(sel[:, 3:4], select_topk(big[:, 3:4], 50))


def test_indexer_kl_loss_hand_worked():
    """KL(p || softmax(I)) by hand, dense and restricted to the selected set."""
    s = torch.tensor([[[1.0, 0.0, float("-inf")]]])
    p = torch.tensor([[[0.75, 0.25, 0.0]]])
    q = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    want = 0.75 * torch.log(0.75 / q[0]) + 0.25 * torch.log(0.25 / q[1])
    assert abs(indexer_kl_loss(s, p).item() - want.item()) < 1e-6
    s2 = torch.tensor([[[2.0, 1.0, 0.0]]])
    p2 = torch.tensor([[[0.5, 0.2, 0.3]]])
    sel = torch.tensor([[[True, False, True]]])  # S_t = {0, 2}: p renormalized to (5/8, 3/8)
    q2 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    want2 = 0.625 * torch.log(0.625 / q2[0]) + 0.375 * torch.log(0.375 / q2[1])
    assert abs(indexer_kl_loss(s2, p2, sel).item() - want2.item()) < 1e-6
    assert indexer_kl_loss(torch.log(p2), p2).abs().item() < 1e-6  # matching distributions: zero


def test_warmup_trains_only_the_indexer_and_lowers_its_loss():
    """Dense warm-up: main weights frozen and untouched, the indexer KL falls; the LM loss sends no
    gradient into the indexer, the indexer loss none into the rest."""
    cfg = _dsa_tiny(num_nextn_predict_layers=0)
    m = CausalLM(cfg).init_weights(seed=5, std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    m.train()
    out = m(ids, labels=ids)
    out.ce_loss.backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in indexer_parameters(m))
    m.zero_grad()
    out.indexer_loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".indexer." not in n)
    m.zero_grad()
    set_dsa_stage(m, "warmup")
    params = freeze_all_but_indexer(m)
    assert len(params) == 5 * cfg.num_hidden_layers
    frozen = {k: v.clone() for k, v in m.state_dict().items() if ".indexer." not in k}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m(ids, labels=ids).indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen.items())
    m.eval()
    assert m(ids).indexer_loss is None  # eval mode: no indexer work beyond selection


def test_config_fields_and_accounting():
    cfg = _dsa_tiny()
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d).to_hf_dict() == d
    assert "index_topk" not in preset("tiny").to_hf_dict()  # existing configs unchanged
    v32 = ModelConfig.from_hf_dict({**preset("tiny").to_hf_dict(), "model_type": "deepseek_v32"})
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)  # transformers' defaults
    from moonlet.config import ConfigError
    with pytest.raises(ConfigError, match="model_type='deepseek_v32'"):
        preset("tiny").replace(index_topk=8)
    with pytest.raises(ConfigError, match="q_lora_rank"):
        _dsa_tiny(q_lora_rank=None)
    with pytest.raises(ConfigError, match="index_head_dim"):
        _dsa_tiny(index_head_dim=8)
    m = CausalLM(cfg)
    n_idx = sum(p.numel() for n, p in m.named_parameters() if ".indexer." in n)
    extra = dsa_extra_params(cfg)
    assert n_idx == extra["main"] + extra["mtp"]
