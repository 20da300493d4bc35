"""Checkpoint interop beyond logit parity: FP8 releases, shards, MTP, convert, atomicity, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moonlet
from moonlet.cli import main as cli_main
from moonlet.config import ConfigError, ModelConfig
from moonlet.interop import CheckpointError, save_pretrained, to_hf_state_dict
from moonlet.interop import store

# dims chosen so FP8 128x128 blocks are partial (160 = 128 + 32, 200, 136, 72) and grids are 2-D
SMALL = dict(vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=136, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=1)


def _model(seed: int = 0, **changes) -> moonlet.CausalLM:
    cfg = ModelConfig(**{**SMALL, **changes}).validate()
    m = moonlet.CausalLM(cfg).init_weights(seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.moe_layers():
            b = mod.gate.e_score_correction_bias
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return m.eval()


def _ids(vocab: int, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(7))


def _same_state(a: moonlet.CausalLM, b: moonlet.CausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k].float(), sb[k].float()), k


# ---- FP8 block-scaled releases ----------------------------------------------------------------------------
def _quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantization, written independently of moonlet: per 128x128 block,
    scale = amax / 448 (e4m3 max), stored as `weight_scale_inv` = scale, W_q = W / scale."""
    rows, cols = w.shape
    gr, gc = math.ceil(rows / block), math.ceil(cols / block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(gr, gc)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _dequant_reference(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = q.shape
    s = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q.float() * s


def _write_hub_fp8(model: moonlet.CausalLM, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A DeepSeek-V3-release-style directory, built by hand: hub config.json (rope_scaling, torch_dtype,
    quantization_config, auto_map), bf16 + FP8 tensors, MTP layer with its embedding/head copies, two
    shards and an index. Returns {weight name: (fp8, scale)}."""
    path.mkdir()
    cfg = model.config.to_hf_dict()
    cfg.update(torch_dtype="bfloat16", transformers_version="4.33.1", ep_size=1,
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
               quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]})
    (path / "config.json").write_text(json.dumps(cfg))
    tensors, quant = {}, {}
    for name, t in to_hf_state_dict(model).items():
        t = t.detach()
        if name.endswith("_proj.weight") and name.startswith("model.layers."):
            q, s = _quantize_fp8(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            quant[name] = (q, s)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = t.float().clone()
        else:
            tensors[name] = t.to(torch.bfloat16).clone()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for f, ns in halves.items():
        save_file({n: tensors[n].contiguous() for n in ns}, str(path / f))
        weight_map.update({n: f for n in ns})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return quant


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    model = _model(seed=11)
    path = tmp_path_factory.mktemp("fp8") / "release"
    quant = _write_hub_fp8(model, path)
    return model, path, quant


def test_fp8_release_loads_to_dequantized_weights(fp8_release):
    orig, path, quant = fp8_release
    assert any(q.shape[0] % 128 and q.shape[1] % 128 for q, _ in quant.values())  # partial blocks covered
    assert any(s.shape[0] > 1 and s.shape[1] > 1 for _, s in quant.values())  # 2-D scale grids covered
    model = moonlet.from_pretrained(path)  # float32
    hf = to_hf_state_dict(model)
    orig_hf = to_hf_state_dict(orig)
    for name, (q, s) in quant.items():
        ref = _dequant_reference(q, s)
        assert torch.equal(hf[name], ref), name  # exactly DeepSeek's dequantization
        w = orig_hf[name].float()
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step (2^-10 x scale)
        bound = w.abs() * 2 ** -4 + 2 ** -10 * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(
            128, 1)[:, :w.shape[1]] + 1e-12
        assert ((hf[name] - w).abs() <= bound).all(), name
    for name, t in hf.items():  # the unquantized tensors: exactly the stored bf16 (bias: float32)
        if name not in quant:
            want = orig_hf[name].float() if "correction_bias" in name else orig_hf[name].bfloat16().float()
            assert torch.equal(t, want), name
    assert "quantization_config" not in model.config.extra  # dequantized in memory: config says so
    assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    ids = _ids(SMALL["vocab_size"])
    with torch.no_grad():
        ref, out = orig(ids).logits, model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel  # FP8 rounding (~2-4% per weight) through 3 blocks: measured 6.4% here
    assert moonlet.from_pretrained(path, dtype="auto").dtype == torch.bfloat16


def test_convert_fp8_release_to_bf16(fp8_release, tmp_path, capsys):
    _, path, _ = fp8_release
    out = tmp_path / "bf16"
    assert cli_main(["convert", str(path), str(out), "--shard-size", "400KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "auto_map" not in cfg
    assert cfg["torch_dtype"] == "bfloat16" and cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    assert "model.layers.2.embed_tokens.weight" in index["weight_map"]  # MTP with DeepSeek's copies
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    for f in set(index["weight_map"].values()):
        with safe_open(str(out / f), "pt") as sf:
            for k in sf.keys():
                want = torch.float32 if "correction_bias" in k else torch.bfloat16
                assert sf.get_slice(k).get_dtype() == ("F32" if want == torch.float32 else "BF16"), k
    a = moonlet.from_pretrained(path, dtype=torch.bfloat16)
    b = moonlet.from_pretrained(out, dtype=torch.bfloat16)
    _same_state(a, b)  # bf16 of the dequantized FP8 either way
    assert cli_main(["convert", str(path), str(out)]) == 1  # refuses to overwrite silently
    assert "not empty" in capsys.readouterr().err


def test_fp8_bad_scale_and_unsupported_quantization(tmp_path):
    model = _model(seed=2)
    p = tmp_path / "r"
    _write_hub_fp8(model, p)
    cfg = json.loads((p / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"  # (compressed-tensors: tests/test_compressed_tensors.py)
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_method 'awq' is not supported"):
        moonlet.from_pretrained(p)
    cfg["quantization_config"]["quant_method"] = "fp8"
    (p / "config.json").write_text(json.dumps(cfg))
    index = json.loads((p / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    f = p / index["weight_map"][name]
    tensors = load_file(str(f))
    tensors[name] = torch.ones(1, 1)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"q_a_proj.weight_scale_inv has shape \(1, 1\), expected \(2, 2\)"):
        moonlet.from_pretrained(p)


# ---- layout: shards, experts, MTP, ties ---------------------------------------------------------------------
def test_sharded_round_trip_and_layout(tmp_path):
    model = _model(seed=3)
    out = save_pretrained(model, tmp_path / "ck", max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(f.name for f in out.glob("*.safetensors")) == shards
    total = 0
    for f in shards:
        size = sum(t.nbytes for t in load_file(str(out / f)).values())
        total += size
        assert size <= 300_000 or len(load_file(str(out / f))) == 1
    assert index["metadata"]["total_size"] == total
    names = set(index["weight_map"])
    # experts per expert on disk, MTP as layer L with DeepSeek's embedding / head copies
    assert {f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert not any(".experts.gate_proj" in n or "gate_up_proj" in n for n in names)
    assert {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight",
            "model.layers.2.shared_head.norm.weight", "model.layers.2.embed_tokens.weight",
            "model.layers.2.shared_head.head.weight", "model.layers.2.mlp.experts.3.down_proj.weight"} <= names
    mode = 0o666 & ~_umask()
    assert all((out / f).stat().st_mode & 0o777 == mode for f in shards + ["config.json"])
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    back = moonlet.from_pretrained(out)
    _same_state(model, back)
    ids = _ids(SMALL["vocab_size"])
    with torch.no_grad():  # MTP weights survive: MTP logits equal
        a = model(ids, labels=ids, run_mtp=True)
        b = back(ids, labels=ids, run_mtp=True)
    assert torch.equal(a.mtp_logits[0], b.mtp_logits[0]) and torch.equal(a.logits, b.logits)


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_transformers_loads_sharded_export_and_ignores_mtp(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(seed=4, model_type="kimi_k2", num_key_value_heads=2)
    out = save_pretrained(model, tmp_path / "k2", max_shard_size="300KB")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any(k.startswith("model.layers.2.") for k in hf.state_dict())  # the MTP layer is not loaded
    ids = _ids(SMALL["vocab_size"])
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids).logits).abs().max() <= 1e-4


def test_transformers_in_memory_fused_experts(tmp_path):
    """transformers keeps experts fused in memory (gate_up_proj [E, 2I, D]); that layout reads too."""
    transformers = pytest.importorskip("transformers")
    from moonlet.interop import from_hf_state_dict

    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in SMALL.items()}, num_key_value_heads=2)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.05)
    sd = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    with pytest.warns(UserWarning, match="without MTP"):
        cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
        state = from_hf_state_dict(cfg, sd)
    model = moonlet.CausalLM(cfg.replace(num_nextn_predict_layers=0)).eval()
    model.load_state_dict(state)
    ids = _ids(SMALL["vocab_size"])
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids).logits).abs().max() <= 1e-4


def test_mtp_options_and_meta_device(tmp_path):
    model = _model(seed=5)
    full = save_pretrained(model, tmp_path / "full")
    no_mtp = moonlet.from_pretrained(full, mtp=False)
    assert no_mtp.config.num_nextn_predict_layers == 0 and len(no_mtp.mtp) == 0
    slim = save_pretrained(model, tmp_path / "slim", mtp=False)
    assert json.loads((slim / "config.json").read_text())["num_nextn_predict_layers"] == 0
    with safe_open(str(slim / "model.safetensors"), "pt") as sf:
        assert not any(k.startswith("model.layers.2.") for k in sf.keys())
    meta = moonlet.from_pretrained(full, device="meta")  # validated, nothing read
    assert meta.lm_head.weight.is_meta and len(meta.mtp) == 1
    bf = moonlet.from_pretrained(full, dtype="bf16")
    assert bf.dtype == torch.bfloat16 and bf.model.rotary.inv_freq.dtype == torch.float32
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in bf.moe_layers())
    cast = moonlet.from_pretrained(full).to(torch.bfloat16)  # a cast keeps RoPE frequencies exact too
    assert torch.equal(cast.model.rotary.inv_freq, model.model.rotary.inv_freq)
    tied = _model(seed=6, tie_word_embeddings=True)
    p = save_pretrained(tied, tmp_path / "tied")
    with safe_open(str(p / "model.safetensors"), "pt") as sf:
        assert "lm_head.weight" not in sf.keys()
    back = moonlet.from_pretrained(p)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    _same_state(tied, back)


def test_convert_moonlet_to_hf_options(tmp_path, capsys):
    model = _model(seed=8)
    src = save_pretrained(model, tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "trainer_state.pt").write_bytes(b"x")
    dst = tmp_path / "dst"
    assert cli_main(["convert", str(src), str(dst), "--dtype", "bf16", "--no-mtp", "--shard-size", "250KB"]) == 0
    assert (dst / "tokenizer.json").exists() and not (dst / "trainer_state.pt").exists()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    back = moonlet.from_pretrained(dst)
    ref = moonlet.from_pretrained(src, mtp=False).to(torch.bfloat16).float()
    _same_state(ref, back)


# ---- atomic writes ---------------------------------------------------------------------------------------
def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    a, b = _model(seed=9), _model(seed=10)
    path = save_pretrained(a, tmp_path / "ck", max_shard_size="300KB")
    (path / "tokenizer.json").write_text('{"v": 1}')
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    calls = {"n": 0}
    real = store.save_file

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(store, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(b, path, max_shard_size="300KB")
    monkeypatch.setattr(store, "save_file", real)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    save_pretrained(b, path)  # now single-file: stale shards gone, tokenizer kept
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    _same_state(b, moonlet.from_pretrained(path))


# ---- bad input: one clear error naming the tensor / file --------------------------------------------------
@pytest.fixture
def ckpt(tmp_path):
    return save_pretrained(_model(seed=12), tmp_path / "ck")


def _rewrite(path: Path, fn) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def _cli_error(capsys, src: Path, out: Path) -> str:
    assert cli_main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moonlet convert: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
    return err


def test_missing_tensor(ckpt, tmp_path, capsys):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        moonlet.from_pretrained(ckpt)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in _cli_error(capsys, ckpt, tmp_path / "o")


def test_wrong_shape(ckpt, tmp_path, capsys):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(64, 40)}))
    msg = r"model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape \(64, 40\).*implies \(64, 48\)"
    with pytest.raises(CheckpointError, match=msg):
        moonlet.from_pretrained(ckpt)
    assert "(64, 40)" in _cli_error(capsys, ckpt, tmp_path / "o")


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.indexer.wq.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.indexer\.wq\.weight"):
        moonlet.from_pretrained(ckpt)
    with pytest.warns(UserWarning, match="unexpected tensor"):
        moonlet.from_pretrained(ckpt, strict=False)


def test_missing_or_truncated_shard(tmp_path, capsys):
    path = save_pretrained(_model(seed=13), tmp_path / "ck", max_shard_size="300KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        moonlet.from_pretrained(path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} listed in .* is missing"):
        moonlet.from_pretrained(path)
    assert shard.name in _cli_error(capsys, path, tmp_path / "o")
    (path / "model.safetensors.index.json").unlink()
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        moonlet.from_pretrained(path)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(n_routed_experts=10, n_group=4), r"n_routed_experts \(10\) must be divisible by n_group \(4\)"),
    (lambda d: d.update(hidden_size="160"), r"hidden_size must be an integer, got '160'"),
    (lambda d: d.update(norm_topk_prob="yes"), r"norm_topk_prob must be true or false, got 'yes'"),
    (lambda d: d.update(rope_scaling="yarn"), r"rope_scaling must be an object or null, got 'yarn'"),
])
def test_bad_config_in_checkpoint(ckpt, tmp_path, capsys, edit, message):
    d = json.loads((ckpt / "config.json").read_text())
    edit(d)
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
        moonlet.from_pretrained(ckpt)
    assert re.search(message, _cli_error(capsys, ckpt, tmp_path / "o"))


def test_malformed_config_cli_no_traceback(ckpt, tmp_path):
    (ckpt / "config.json").write_text('{"hidden_size": 160,')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        moonlet.from_pretrained(ckpt)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "moonlet", "convert", str(ckpt), str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json is not valid JSON" in lines[0] and "Traceback" not in r.stderr
