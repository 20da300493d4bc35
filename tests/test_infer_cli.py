"""`moonlet generate` / `moonlet chat` on checkpoints the test builds (subprocess), and the engine on
a transformers-saved DeepSeek-V3 directory against transformers' own greedy generate."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moonlet.config import preset
from moonlet.data.tokenizer import train_tokenizer
from moonlet.model import CausalLM

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moonlet", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789"] * 20, vocab_size=300)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2)
    CausalLM(cfg).init_weights(seed=3, std=0.05).save_pretrained(d / "with_tok")
    tok.save(d / "with_tok")
    CausalLM(cfg).init_weights(seed=3, std=0.05).save_pretrained(d / "no_tok")
    return d


def test_generate_streams_and_reports_speed(ckpt):
    r = _cli("generate", str(ckpt / "with_tok"), "--prompt", "the quick", "--max-new-tokens", "8", "--ignore-eos",
             "--temperature", "0.7", "--seed", "1", "--speculative", "2")
    assert r.returncode == 0, r.stderr
    assert "8 generated (length)" in r.stderr and "tok/s" in r.stderr and "MTP acceptance" in r.stderr
    again = _cli("generate", str(ckpt / "with_tok"), "--prompt", "the quick", "--max-new-tokens", "8",
                 "--ignore-eos", "--temperature", "0.7", "--seed", "1", "--speculative", "2")
    assert again.stdout == r.stdout  # same seed, same text


def test_generate_compiled_int8_equals_eager(ckpt):
    args = ("generate", str(ckpt / "no_tok"), "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--ignore-eos",
            "--quantize", "int8")
    eager, compiled = _cli(*args), _cli(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, eager.stderr + compiled.stderr
    assert compiled.stdout == eager.stdout and len(compiled.stdout.split()) == 6


def test_generate_without_tokenizer(ckpt):
    r = _cli("generate", str(ckpt / "no_tok"), "--prompt", "hi")
    assert r.returncode == 1 and "--prompt-ids" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("generate", str(ckpt / "no_tok"), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 4
    r = _cli("generate", str(ckpt / "missing"), "--prompt-ids", "5")
    assert r.returncode == 1 and "error" in r.stderr


def test_chat_reset_exit(ckpt):
    r = _cli("chat", str(ckpt / "with_tok"), "--max-new-tokens", "5", stdin="hello\n/reset\nfox?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and "history cleared" in r.stderr


def test_engine_on_transformers_checkpoint_matches_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moonlet.infer import Engine, SamplingParams

    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=1, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" not in name else 0.1) + ("norm" in name))
    hf.save_pretrained(tmp_path)
    prompt = [5, 17, 99, 3, 42]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=12)[0, len(prompt):].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = Engine.from_pretrained(tmp_path)
    assert eng.tokenizer is None
    out = eng.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == ref
