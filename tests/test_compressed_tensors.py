"""compressed-tensors INT4 / INT8 checkpoints (moonlet.interop.compressed): the packing against a hand-worked
word and the library's own pack/unpack, transformers loading moonlet's export, a Kimi-K2-Thinking-style
checkpoint written with the library's quantizer, exact round trips, the engine, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moonlet
from moonlet.cli import main as cli_main
from moonlet.config import ConfigError, ModelConfig
from moonlet.infer import Engine, SamplingParams
from moonlet.interop import CheckpointError, save_pretrained
from moonlet.interop import compressed
from moonlet.model.quant import QuantExperts, QuantLinear, QuantWeight, pack_int4, quantize_model

# every Linear's input dim is a multiple of 32 (int4 groups of 32, K2-Thinking's)
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
             max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
# Kimi-K2-Thinking's quantization_config (its config.json): int4 groups of 32 on the routed experts only
K2_QC = {"config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                       "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                                   "group_size": 32, "num_bits": 4, "observer": "minmax",
                                                   "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                                   "type": "int"}}},
         "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                                "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
         "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def _model(seed: int = 0, **changes) -> moonlet.CausalLM:
    cfg = ModelConfig(**{**SMALL, **changes}).validate()
    return moonlet.CausalLM(cfg).init_weights(seed=seed, std=0.05).eval()


def _ids(T: int = 10) -> torch.Tensor:
    return torch.randint(2, SMALL["vocab_size"], (2, T), generator=torch.Generator().manual_seed(7))


def _quant_weights(model) -> dict[str, QuantWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}


# ---- the format, by hand and against the library ------------------------------------------------------------
def test_int4_word_by_hand():
    # values 0..7 -> stored 8..15, value k at bits 4k: the word 0xFEDCBA98 (as int32: 0xFEDCBA98 - 2^32)
    q = torch.arange(8, dtype=torch.int8)[None]
    word = 0xFEDCBA98 - 2**32
    assert compressed.pack(q, 4).tolist() == [[word]]
    assert compressed.unpack(torch.tensor([[word]], dtype=torch.int32), 4, 8).tolist() == q.tolist()
    # moonlet's canonical int4 of the same values: bytes 0x98 0xBA 0xDC 0xFE, the word's little-endian bytes
    assert pack_int4(q).tolist() == [[0x98, 0xBA, 0xDC, 0xFE]]
    assert compressed.to_moonlet(torch.tensor([[word]], dtype=torch.int32), 4, 8).tolist() == [[0x98, 0xBA, 0xDC, 0xFE]]
    # 8-bit: -128, -1, 0, 127 -> 0x00, 0x7F, 0x80, 0xFF at bits 0, 8, 16, 24
    q8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert compressed.pack(q8, 8).tolist() == [[0xFF807F00 - 2**32]]
    assert compressed.to_packed(q8, "int8").tolist() == [[0xFF807F00 - 2**32]]


@pytest.mark.parametrize("bits,K", [(4, 64), (4, 12), (8, 40), (8, 6)])
def test_packing_matches_the_library(bits, K):
    """compressed-tensors' own pack_to_int32 / unpack_from_int32 are the reference (K not filling the last
    word takes moonlet's arithmetic path, else the byte reinterpretation)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (5, K), generator=torch.Generator().manual_seed(bits + K), dtype=torch.int8)
    ref = helpers.pack_to_int32(q, bits)
    assert torch.equal(compressed.pack(q, bits), ref)
    assert torch.equal(compressed.unpack(ref, bits, K), helpers.unpack_from_int32(ref, bits, torch.Size((5, K))))
    canonical = pack_int4(q) if bits == 4 else q
    assert torch.equal(compressed.to_moonlet(ref, bits, K), canonical)
    assert torch.equal(compressed.to_packed(canonical, f"int{bits}"), ref)


# ---- moonlet's export, read by transformers and by moonlet ------------------------------------------------
@pytest.mark.parametrize("scheme,experts_only", [("int4", True), ("int8", False)])
def test_transformers_loads_moonlet_export(tmp_path, scheme, experts_only):
    """transformers + compressed-tensors decompress moonlet's export to the same weights: logits within 1e-4
    of moonlet's model with the dequantized weights (K2-Thinking's int4 experts-only recipe; int8 everywhere)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = _model(seed=1, model_type="kimi_k2", num_key_value_heads=2, num_nextn_predict_layers=0)
    ids = _ids()
    with torch.no_grad():
        float_logits = model(ids).logits
    quantize_model(model, scheme, experts_only=experts_only)
    out = save_pretrained(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if experts_only:  # the float Linears are listed in ignore, as in K2-Thinking's config
        assert "model.layers.1.self_attn.kv_b_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
        assert "model.layers.1.mlp.shared_experts.down_proj" in qc["ignore"]
    deq = moonlet.from_pretrained(out)  # dequantized on read: moonlet's float model of the same weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = deq(ids).logits
        got = hf(ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4
    assert (want - float_logits).abs().max() > 1e-3  # the weights really are the quantized ones


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_round_trip_is_bit_exact(tmp_path, scheme):
    model = _model(seed=2)  # with an MTP depth: its Linears are quantized and exported too
    quantize_model(model, scheme)
    out = save_pretrained(model, tmp_path / "q")
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.down_proj"
    assert tensors[name + ".weight_packed"].dtype == torch.int32 and name + ".weight" not in tensors
    assert tensors[name + ".weight_shape"].tolist() == [64, 32]
    assert tensors[name + ".weight_scale"].dtype == torch.float32  # fp32 model: fp32 scales (exact bf16 values)
    assert tensors[name + ".weight_scale"].shape == (64, 1)  # int8: per row; int4: one group of 32 per row
    assert "model.layers.2.eh_proj.weight_packed" in tensors  # the MTP layer (L + 0)
    kept = moonlet.from_pretrained(out, keep_quantized=True)
    a, b = model.state_dict(), kept.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # the same ints (in the same kernel layout) and the same bf16 scales
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert isinstance(kept.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(kept.mtp[0].eh_proj, QuantLinear)
    deq = moonlet.from_pretrained(out)  # dequantized on read: exactly the quantized model's float weights
    d = deq.state_dict()
    for n, w in _quant_weights(model).items():
        assert torch.equal(w.dequantize(torch.float32), d[n + ".weight" if n + ".weight" in d else n]), n
    save_pretrained(kept, tmp_path / "again")  # saving what was loaded writes the same tensors
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_engine_serves_the_checkpoint_quantized(tmp_path):
    """Engine.from_pretrained keeps the stored ints: greedy output = the in-memory quantized model's."""
    model = _model(seed=3, num_nextn_predict_layers=0)
    quantize_model(model, "int4")
    save_pretrained(model, tmp_path / "q", max_shard_size="100KB")  # sharded: the index maps the packed tensors
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 1
    eng = Engine.from_pretrained(tmp_path / "q", max_batch=2)
    assert isinstance(eng.model.model.layers[1].mlp.experts, QuantExperts)
    prompts = [[5, 9, 2, 77], [3, 1, 4, 1, 5, 9]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    got = [r.token_ids for r in eng.generate(prompts, params)]
    want = [r.token_ids for r in Engine(model, max_batch=2).generate(prompts, params)]
    assert got == want


def test_convert_quantize_cli(tmp_path, capsys):
    """`moonlet convert SRC DST --quantize int4 --quant-experts-only` == quantize_model + save_pretrained."""
    model = _model(seed=7, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path / "f")
    (tmp_path / "f" / "tokenizer.json").write_text("{}")
    assert cli_main(["convert", str(tmp_path / "f"), str(tmp_path / "q"), "--quantize", "int4",
                     "--quant-experts-only"]) == 0
    assert "int4 (group 32)" in capsys.readouterr().err
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    quantize_model(model, "int4", experts_only=True)
    kept = moonlet.from_pretrained(tmp_path / "q", keep_quantized=True)
    a, b = model.state_dict(), kept.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli_main(["convert", str(tmp_path / "f"), str(tmp_path / "q"), "--quantize", "int8"]) == 1
    assert "not empty" in capsys.readouterr().err


# ---- a Kimi-K2-Thinking-style checkpoint written with the library's quantizer ----------------------------------
def _k2_thinking_checkpoint(path: Path, scale_dtype=torch.bfloat16) -> tuple[moonlet.CausalLM, dict]:
    """A float checkpoint whose routed experts are then quantized and packed by compressed-tensors' own
    functions (symmetric int4, groups of 32, scale = amax / 7.5 in bf16 as the library computes it) under
    K2-Thinking's exact quantization_config. -> (float model, {expert weight name: (q int8, scale)})."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = _model(seed=4, model_type="kimi_k2", num_key_value_heads=2, num_nextn_predict_layers=0)
    save_pretrained(model, path)
    tensors = load_file(str(path / "model.safetensors"))
    args = QuantizationArgs(**K2_QC["config_groups"]["group_0"]["weights"])
    ref = {}
    for name in [n for n in tensors if ".mlp.experts." in n]:
        w = tensors.pop(name).to(scale_dtype)
        g = w.unflatten(-1, (-1, 32))
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args)
        q = quantize(w, scale, None, args, dtype=torch.int8)
        base = name.removesuffix(".weight")
        tensors.update({base + ".weight_packed": pack_to_int32(q, 4), base + ".weight_scale": scale,
                        base + ".weight_shape": torch.tensor(w.shape)})
        ref[name] = (q, scale)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = K2_QC
    (path / "config.json").write_text(json.dumps(cfg))
    return model, ref


def test_k2_thinking_style_checkpoint(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    model, ref = _k2_thinking_checkpoint(tmp_path / "k2")
    assert any(int(q.min()) == -8 for q, _ in ref.values())  # the library uses the full range -8..7
    args = QuantizationArgs(**K2_QC["config_groups"]["group_0"]["weights"])
    # dequantized on read, in the scales' dtype: bit-equal to the library's dequantization
    bf = moonlet.from_pretrained(tmp_path / "k2", dtype="bf16")
    sd = bf.state_dict()
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    q, scale = ref[name]
    assert sd["model.layers.1.mlp.experts.up_proj"].dtype == torch.bfloat16
    assert torch.equal(sd["model.layers.1.mlp.experts.up_proj"][2], dequantize(q, scale, args=args))
    # attention, shared experts, the dense MLP and lm_head (all in `ignore`) load as they were saved
    fsd = model.state_dict()
    for k in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(sd[k].float(), fsd[k].to(torch.bfloat16).float()), k
    # kept quantized: experts only, from the stored ints (values -8..7 and scales as stored)
    kept = moonlet.from_pretrained(tmp_path / "k2", keep_quantized=True)
    ex = kept.model.layers[1].mlp.experts
    assert isinstance(ex, QuantExperts) and not isinstance(kept.model.layers[1].self_attn.kv_b_proj, QuantWeight)
    qk, sk = ex.up_proj.parts(2)
    assert torch.equal(qk, pack_int4(q)) and torch.equal(sk, scale)
    with torch.no_grad():
        fp32 = moonlet.from_pretrained(tmp_path / "k2")
        assert (kept(_ids()).logits - fp32(_ids()).logits).abs().max() < 0.05  # bf16 activations in the kernel
    # convert: a plain bf16 checkpoint of the dequantized weights
    assert cli_main(["convert", str(tmp_path / "k2"), str(tmp_path / "plain")]) == 0
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert not any(k.endswith("weight_packed") for k in plain)
    assert torch.equal(plain[name], dequantize(q, scale, args=args))
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    # moonlet info reads the config (quantization_config is kept as an unknown key)
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "k2" / "config.json")]) == 0
    assert "(deepseek_v3)" in capsys.readouterr().out


def test_two_groups_channel_tensor_and_int_quantized(tmp_path):
    """Two config groups with explicit targets: routed experts int4 per channel (pack-quantized), q_b_proj int8
    with one scale per tensor stored as plain int8 (`int-quantized`); every weight dequantizes to q * scale."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    model = _model(seed=6, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    ref = {}
    for name in [n for n in tensors if ".mlp.experts." in n or n.endswith(("q_b_proj.weight", "o_proj.weight"))]:
        N, K = tensors.pop(name).shape
        base = name.removesuffix(".weight")
        if name.endswith("o_proj.weight"):  # int8 in groups of 16: moonlet's int8 modules cannot hold it
            q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            scale = (torch.rand(N, K // 16, generator=g) / 50).to(torch.bfloat16)
            tensors.update({name: q, base + ".weight_scale": scale})
            ref[name] = (q.float().unflatten(1, (-1, 16)) * scale.float()[..., None]).flatten(1)
            continue
        if ".experts." in name:
            q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
            scale = (torch.rand(N, 1, generator=g) / 50).to(torch.bfloat16)
            tensors.update({base + ".weight_packed": helpers.pack_to_int32(q, 4), base + ".weight_scale": scale,
                            base + ".weight_shape": torch.tensor([N, K])})
        else:
            q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            scale = torch.tensor([0.0009765625])  # 2^-10, float32
            tensors.update({name: q, base + ".weight_scale": scale})
        ref[name] = q.float() * scale.float()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    weights = lambda **kw: {"num_bits": 4, "type": "int", "symmetric": True, **kw}  # noqa: E731
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
        "config_groups": {"experts": {"targets": ["re:.*mlp\\.experts\\.\\d+\\..*"], "format": "pack-quantized",
                                      "weights": weights(strategy="channel")},
                          "attn": {"targets": ["re:.*q_b_proj$"], "format": "int-quantized",
                                   "weights": weights(num_bits=8, strategy="tensor")},
                          "o": {"targets": ["re:.*o_proj$"], "format": "int-quantized",
                                "weights": weights(num_bits=8, strategy="group", group_size=16)}},
        "ignore": ["lm_head"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    deq = moonlet.from_pretrained(tmp_path / "m")
    sd = deq.state_dict()
    for name, w in ref.items():
        if ".experts." in name:
            layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            got = sd[f"model.layers.{layer}.mlp.experts.{proj}"][e]
        else:
            got = sd[name]
        assert torch.equal(got, w), name
    with pytest.warns(UserWarning, match="int8 in groups.*they are dequantized"):
        kept = moonlet.from_pretrained(tmp_path / "m", keep_quantized=True)
    o_proj = kept.model.layers[1].self_attn.o_proj
    assert not isinstance(o_proj, QuantWeight) and torch.equal(o_proj.weight, ref["model.layers.1.self_attn.o_proj.weight"])
    ex, qb = kept.model.layers[1].mlp.experts, kept.model.layers[1].self_attn.q_b_proj
    assert isinstance(ex, QuantExperts) and ex.down_proj.group_size == 32  # one group per row = per channel
    assert isinstance(qb, QuantLinear) and qb.scheme == "int8" and torch.equal(qb.weight, sd["model.layers.1.self_attn.q_b_proj.weight"])
    with torch.no_grad():
        assert (kept(_ids()).logits - deq(_ids()).logits).abs().max() < 0.05  # bf16 activations in the kernels


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory) -> Path:
    model = _model(seed=5, num_nextn_predict_layers=0)
    quantize_model(model, "int4")
    return save_pretrained(model, tmp_path_factory.mktemp("bad") / "q")


def _copy_with(src: Path, dst: Path, qc_edit=None, tensors_edit=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if qc_edit:
        qc_edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


W = "config_groups"
EX = "model.layers.1.mlp.experts.0.gate_proj"


@pytest.mark.parametrize("edit,error,message", [
    (lambda qc: qc[W]["group_0"]["weights"].update(symmetric=False), ConfigError, "asymmetric quantization"),
    (lambda qc: qc[W]["group_0"]["weights"].update(num_bits=2), ConfigError, "num_bits 2 is not supported"),
    (lambda qc: qc[W]["group_0"]["weights"].update(type="float"), ConfigError, "type 'float' is not supported"),
    (lambda qc: qc.update(format="nvfp4-pack-quantized"), ConfigError, "format 'nvfp4-pack-quantized'"),
    (lambda qc: qc[W]["group_0"].update(input_activations={"num_bits": 8}), ConfigError, "activation quantization"),
    (lambda qc: qc["ignore"].append("re:.*experts.*"), CheckpointError, "leave module .* in float"),
])
def test_bad_config(int4_ckpt, tmp_path, edit, error, message):
    bad = _copy_with(int4_ckpt, tmp_path / "bad", qc_edit=edit)
    with pytest.raises(error, match=message):
        moonlet.from_pretrained(bad)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(EX + ".weight_scale"), rf"missing tensor {EX}\.weight_scale"),
    (lambda t: t.update({EX + ".weight_shape": torch.tensor([32, 128])}), r"expected int32 \(32, 16\)"),
    (lambda t: t.update({EX + ".weight_shape": torch.tensor([32])}), "must hold two positive integers"),
    (lambda t: t.update({EX + ".weight_scale": torch.ones(32, 1)}), r"expected a float tensor of shape \(32, 2\)"),
    (lambda t: t.update({EX + ".weight_zero_point": torch.zeros(1, 32, dtype=torch.int32)}), "zero point"),
])
def test_bad_tensors(int4_ckpt, tmp_path, edit, message):
    bad = _copy_with(int4_ckpt, tmp_path / "bad", tensors_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        moonlet.from_pretrained(bad, keep_quantized=True)


def test_cli_one_line_errors(int4_ckpt, tmp_path, capsys):
    bad = _copy_with(int4_ckpt, tmp_path / "bad", qc_edit=lambda qc: qc[W]["group_0"]["weights"].update(symmetric=False))
    assert cli_main(["generate", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "asymmetric quantization" in err and "Traceback" not in err
    assert cli_main(["generate", str(int4_ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                     "--quantize", "int8"]) == 1
    assert "already quantized" in capsys.readouterr().err
