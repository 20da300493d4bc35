"""DSA / mHC / Engram through the real trainer (`moonlet.train.run.run_training`, the `moonlet train`
path): DSA's dense warm-up trains the indexers alone and lowers their KL, the sparse stage lowers
the LM loss, a dense checkpoint turns into a DSA one with --init + --set, mHC and Engram configs
train, and every lever's checkpoint reloads to the same logits."""

import json

import pytest
import torch

from moonlet.config import ConfigError
from moonlet.data.corpus import bundled_documents
from moonlet.data.tokenizer import train_tokenizer
from moonlet.model.sparse_attention import set_dsa_stage
from moonlet.train.checkpoint import load_model
from moonlet.train.run import run_training

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256)
DSA = dict(model_type="deepseek_v32", index_n_heads=2, index_head_dim=16, index_topk=8)  # topk < seq_len 32


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("levers")
    docs = bundled_documents("val")
    (d / "train.txt").write_text(docs[0][:40_000])
    (d / "val.txt").write_text(docs[1][:6_000])
    train_tokenizer([docs[0][:40_000]], vocab_size=400).save(d / "tok")
    return d


def _sets(**kw) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in {**MICRO, **kw}.items()]


def _run(files, out, **opts):
    """run_training on the micro model; AdamW unless the test is about Muon (this CPU has no native bf16
    matmuls, so Muon's bf16 Newton-Schulz makes a step several times slower)."""
    base = dict(data=[str(files / "train.txt")], val_data=[str(files / "val.txt")], tokenizer=str(files / "tok"),
                batch_size=4, seq_len=32, steps=12, optimizer="adamw", lr=1e-2, warmup_steps=2, eval_interval=0,
                eval_batches=2,
                log_interval=1, save_interval=0, out=str(out))
    return run_training({**base, **opts}, print_fn=lambda *_: None, progress=False)


def _train_records(summary) -> list[dict]:
    return [r for r in summary["trainer"].history if r.get("kind") == "train"]


def _fixed_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (2, 32), generator=g)


def _same_logits_after_reload(summary):
    trained = summary["trainer"].raw_model.eval()
    if trained.config.is_dsa:  # a warm-up run leaves its model in the dense stage; a loaded one is sparse
        set_dsa_stage(trained, "sparse")
    loaded = load_model(summary["run_dir"]).eval()
    # (num_key_value_heads, unused by MLA, is not re-derived when --set changes num_attention_heads)
    assert loaded.config.replace(num_key_value_heads=None) == trained.config.replace(num_key_value_heads=None)
    ids = _fixed_batch()
    with torch.no_grad():
        a, b = trained(ids).logits, loaded(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def dense_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    return _run(files, out, model="tiny", set=_sets(), steps=15, optimizer="muonclip")  # sharper attention than AdamW


@pytest.mark.slow
def test_dsa_warmup_trains_only_the_indexers_and_lowers_their_kl(files, dense_run, tmp_path):
    dense = load_model(dense_run["run_dir"])
    s = _run(files, tmp_path / "warm", init=dense_run["run_dir"], set=_sets(**DSA), dsa_stage="warmup",
             optimizer="muonclip", lr=3e-3, steps=25)
    warm = s["trainer"].raw_model
    assert warm.config.is_dsa and warm.config.index_topk == 8
    d_state, w_state = dense.state_dict(), warm.state_dict()
    new = [k for k in w_state if k not in d_state]
    assert new and all(".indexer." in k for k in new)
    for k, v in d_state.items():  # every dense tensor untouched: weights, router biases (no bias update), QK (no clip)
        assert torch.equal(v, w_state[k]), k
    assert s["trainer"].qk_clip is None and s["trainer"].args.bias_update_gamma == 0
    kl = [r["indexer"] for r in _train_records(s)]
    assert len(kl) == 25 and all(x > 0 for x in kl)
    assert sum(kl[-5:]) / 5 < 0.8 * sum(kl[:5]) / 5, kl
    assert "ce" in _train_records(s)[0]  # the LM loss is still logged (it trains nothing here)
    _same_logits_after_reload(s)

    # the sparse stage from the warmed-up checkpoint: everything trains, the validation loss (sparse
    # attention, measured before step 1 and after the last) goes down
    sp = _run(files, tmp_path / "sparse", init=s["run_dir"], dsa_stage="sparse", steps=12, optimizer="muonclip",
              lr=2e-3, seed=1, eval_interval=12)
    model = sp["trainer"].raw_model
    assert all(m.stage == "sparse" for m in model.modules() if hasattr(m, "indexer"))
    assert model.model.layers[0].self_attn.index_topk < 32  # really sparse at seq_len 32
    assert all(r["indexer"] > 0 for r in _train_records(sp))
    val = [r["val_loss"] for r in sp["trainer"].history if r.get("kind") == "val"]
    assert len(val) == 2 and val[1] < val[0] - 0.01, val
    changed = {k for k, v in load_model(s["run_dir"]).state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert any(".indexer." in k for k in changed) and any("mlp" in k for k in changed)
    _same_logits_after_reload(sp)


def test_one_sparse_step_lowers_the_lm_loss_on_its_batch(files, tmp_path):
    """One optimizer step of a DSA model from scratch (sparse stage, the default) lowers the CE of the
    batch it trained on; the indexer KL enters the objective."""
    s = _run(files, tmp_path / "one", model="tiny", set=_sets(**DSA), steps=1, warmup_steps=0, optimizer="adamw",
             lr=3e-3, grad_accum=1)
    model = s["trainer"].raw_model
    rec = _train_records(s)[0]
    assert rec["indexer"] > 0 and rec["loss"] == pytest.approx(rec["ce"] + rec["mtp"] + rec.get("aux", 0) + rec["indexer"],
                                                                rel=1e-5)
    # replay the step's batch: the loader is seeded, so a fresh loader yields the same first batch
    from moonlet.data.loader import PackedTextLoader
    tr = s["trainer"]
    loader = PackedTextLoader(tr.train_loader.stream, 4, 32, seed=0, mtp_depth=1)
    batch = loader.next_batch()
    model.train()
    with torch.no_grad():
        after = float(model(batch.input_ids, batch.labels, run_mtp=False).ce_loss)
    assert after < rec["ce"]


def test_mhc_and_engram_configs_train_and_reload(files, tmp_path):
    for name, extra in [("mhc", dict(hc_mult=2)),
                        ("engram", dict(engram_layers=[1], engram_table_size=101, engram_heads_per_order=2,
                                        engram_dim_per_order=16, engram_max_ngram=3)),
                        ("all", dict(hc_mult=2, engram_layers=[0], engram_table_size=101, engram_heads_per_order=2,
                                     engram_dim_per_order=16, **DSA))]:
        s = _run(files, tmp_path / name, model="tiny", set=_sets(**extra), steps=12)
        cfg = s["trainer"].raw_model.config
        for k, v in extra.items():
            assert getattr(cfg, k) == v, (name, k)
        ce = [r["ce"] for r in _train_records(s)]
        assert sum(ce[-3:]) < sum(ce[:3]) - 0.3, (name, ce)
        _same_logits_after_reload(s)


def test_dsa_stage_errors(files, dense_run, tmp_path):
    with pytest.raises(ValueError, match="needs a DSA model"):
        _run(files, tmp_path / "a", init=dense_run["run_dir"], dsa_stage="warmup", steps=1)
    with pytest.raises(ConfigError, match="shape of"):
        _run(files, tmp_path / "b", init=dense_run["run_dir"], set=["hidden_size=32"], steps=1)
