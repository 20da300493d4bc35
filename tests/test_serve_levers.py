"""The efficiency levers (DSA, mHC, Engram) through the whole serving path: a checkpoint saved with the
lever on, loaded by Engine.from_pretrained, served by the real app over HTTP with continuous batching.

Reference: greedy decoding by repeated full forwards (no cache) of the model *before* it was saved, so
the test pins the config/checkpoint round trip, the lever's cached decode (DSA index keys, mHC streams,
Engram's decode state) and the server's batching against plain model arithmetic; and the served text
equals the Engine's own greedy output on the same prompt."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import torch

from _serve_fixtures import TEXT, LiveServer

LEVERS = {
    # top-8 of prompts of ~20-30 tokens: the sparse selection really drops keys in prefill and decode
    "dsa": dict(model_type="deepseek_v32", index_n_heads=2, index_head_dim=32, index_topk=8),
    "mhc": dict(hc_mult=2),
    "engram": dict(engram_layers=[1], engram_max_ngram=3, engram_heads_per_order=2, engram_dim_per_order=32,
                   engram_table_size=[211, 307]),
}
N_NEW = 10


def _greedy_full_forward(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from moonlet.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([TEXT], vocab_size=400).save(d)
    return d


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_checkpoint_serves_like_the_engine_and_the_model(lever, tokenizer_dir, tmp_path):
    import moonlet
    from moonlet.config import preset
    from moonlet.data.tokenizer import Tokenizer
    from moonlet.infer.engine import Engine, SamplingParams

    tok = Tokenizer.from_file(tokenizer_dir)
    cfg = preset("tiny").replace(vocab_size=512, num_hidden_layers=2, **LEVERS[lever])
    model = moonlet.CausalLM(cfg).init_weights(seed=3, std=0.05).eval()
    ckpt = tmp_path / lever
    model.save_pretrained(ckpt)
    tok.save(ckpt)

    engine = Engine.from_pretrained(ckpt, max_batch=4)
    assert engine.model.config == cfg
    questions = ["What is 2 + 3?", "Tell me about the quick brown fox and the lazy dog."]
    msgs = [[{"role": "user", "content": q}] for q in questions]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    if lever == "dsa":
        assert min(map(len, prompts)) > cfg.index_topk  # sparse from the prefill on
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    ref = engine.generate(prompts, params)  # the Engine alone, before it serves
    for p, r in zip(prompts, ref):
        assert r.token_ids == _greedy_full_forward(model, p, N_NEW)

    with LiveServer(engine, model_name=lever, max_batch=4) as srv:
        def ask(i: int, out: dict) -> None:
            out[i] = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": lever, "messages": msgs[i], "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True})

        out: dict = {}
        threads = [threading.Thread(target=ask, args=(i, out)) for i in range(len(msgs))]  # batched together
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        for i, r in out.items():
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == N_NEW
            assert body["usage"]["prompt_tokens"] == len(prompts[i])
            assert body["choices"][0]["message"]["content"] == ref[i].text
        assert len(out) == len(msgs)
