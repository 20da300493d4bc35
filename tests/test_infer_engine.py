"""moonlet.infer: cached decoding equals the full forward, batched (ragged, continuous) generation
equals generating alone and the no-cache argmax, seeds, sampling filters, stop strings, the cache
size formula, errors, and the eval harness's EngineBackend against its NaiveBackend."""

import math

import pytest
import torch

from moonlet.accounting import kv_cache_bytes_per_token
from moonlet.config import preset
from moonlet.infer import Engine, SamplingParams
from moonlet.infer.cache import KVCache
from moonlet.infer.sampling import SamplerState, probs_from_logits
from moonlet.infer.scheduler import IncrementalText
from moonlet.model import CausalLM


def _model(**changes):
    return CausalLM(preset("tiny").replace(**changes)).init_weights(seed=1, std=0.05).eval()


def _greedy_reference(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 4096, (n,), generator=g).tolist() for n in lengths]


def test_cached_decode_logits_equal_full_forward(model):
    eng = Engine(model)
    ids = _prompts([20])[0]
    cache = eng.new_cache(1, 32)
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].float()
        logits, _ = eng.prefill(torch.tensor([ids[:5]]), cache.view(0, 1))
        steps = [logits[0, -1]]
        for t in range(5, 20):
            lg, _ = eng.decode(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache.view(0, 1))
            steps.append(lg[0, -1])
    assert (torch.stack(steps) - full[4:]).abs().max().item() <= 1e-4


def test_ragged_continuous_batch_equals_alone_and_full_forward_argmax(model):
    prompts = _prompts([5, 17, 3, 9, 12])
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    # max_batch 2 < 5 prompts: requests are admitted as rows free up (rows are compacted)
    batched = Engine(model, max_batch=2).generate(prompts, [p.__class__(max_new_tokens=n, ignore_eos=True)
                                                            for n in (10, 4, 10, 7, 10)])
    for prompt, res, n in zip(prompts, batched, (10, 4, 10, 7, 10)):
        assert res.token_ids == _greedy_reference(model, prompt, n)
        assert res.finish_reason == "length" and res.completion_tokens == n and res.prompt_tokens == len(prompt)
    alone = Engine(model, max_batch=1).generate(prompts[:1], p)[0]
    assert alone.token_ids == batched[0].token_ids


def test_ragged_prompts_share_one_padded_prefill(model):
    """Prompts of different lengths right-padded into one prefill forward give each prompt's own
    greedy continuation (and the forward really was shared)."""
    prompts = _prompts([5, 17, 3, 9, 12], seed=3)
    eng = Engine(model, max_batch=5)
    calls = []
    prefill = eng.prefill
    eng.prefill = lambda ids, cache, lengths=None: calls.append(ids.shape) or prefill(ids, cache, lengths)
    sched = eng.scheduler()
    sched.max_pad_fraction = 1.0  # take every waiting prompt into one forward
    rids = [sched.add(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in prompts]
    out = {r: [] for r in rids}
    while sched.has_work():
        for ev in sched.step():
            out[ev.request_id].append(ev.token_id)
    assert calls == [(5, 17)]
    for prompt, rid in zip(prompts, rids):
        assert out[rid] == _greedy_reference(model, prompt, 6)


def test_same_seed_same_sample_in_any_batch(model):
    prompts = _prompts([6, 11, 4])
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    other = SamplingParams(max_new_tokens=5, temperature=0.7, seed=7, ignore_eos=True)
    eng = Engine(model, max_batch=4)
    alone = eng.generate([prompts[0]], sp)[0].token_ids
    in_company = eng.generate(prompts, [other, sp, other])[1].token_ids
    assert eng.generate([prompts[1]], sp)[0].token_ids == in_company
    assert eng.generate([prompts[0]], sp)[0].token_ids == alone
    assert eng.generate([prompts[0]], SamplingParams(**{**sp.__dict__, "seed": 124}))[0].token_ids != alone


def test_sampling_filters_hand_worked():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)  # probs ~ [.644, .237, .087, .032]
    p = probs_from_logits(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(p, logits.exp(), atol=1e-6)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.7311, 0.2689, 0, 0]), atol=1e-4)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.85))  # .644 < .85 <= .881
    assert torch.allclose(p, torch.tensor([0.7311, 0.2689, 0, 0]), atol=1e-4)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, min_p=0.1))  # keeps >= .0644
    assert (p > 0).tolist() == [True, True, True, False]
    p = probs_from_logits(torch.tensor([2.0, 0.0]), SamplingParams(temperature=2.0))
    assert math.isclose(float(p[0]), 1 / (1 + math.exp(-1)), rel_tol=1e-5)


def test_penalties_hand_worked():
    sp = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    st = SamplerState(sp, prompt_ids=[0], vocab_size=4)
    st.update(1)
    st.update(1)
    out = st.penalize(torch.tensor([3.0, -2.0, 1.0, 1.0]))
    # token 0: prompt only -> 3/2; token 1: -2*2 - 0.5*2 - 0.25 = -5.25; tokens 2, 3 untouched
    assert torch.allclose(out, torch.tensor([1.5, -5.25, 1.0, 1.0]))


class _PieceTokenizer:
    """Ids are indexes into a list of text pieces (decode = concatenation)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special=True):
        return "".join(self.pieces[i] for i in ids)


def test_stop_string_split_across_tokens_is_held_back_and_cut():
    tok = _PieceTokenizer(["Hel", "lo", " wo", "rld", "!", " w", "x"])
    text = IncrementalText(tok, ("o world",))
    deltas = []
    for t in [0, 1, 5, 6]:  # "Hel" "lo" " w" "x": "o" then "o w" may begin the stop string: held
        deltas.append(text.push(t))
    assert [d for d, _ in deltas] == ["Hel", "l", "", "o wx"] and not any(h for _, h in deltas)
    text = IncrementalText(tok, ("o world",))
    out = [text.push(t) for t in [0, 1, 2, 3]]
    assert "".join(d for d, _ in out) == "Hell" and out[3][1]  # cut at the stop string, hit at "rld"
    assert text.text == "Hell"


def test_stop_strings_and_tokens_in_generation(model):
    prompts = _prompts([8])
    free = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    eng = Engine(model, tokenizer=_PieceTokenizer([f"<{i}>" for i in range(4096)]))
    # the stop string spans token 3 (all but its "<") and the start of token 4
    stop = f"{free[3]}><{free[4]}"
    res = eng.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert res.finish_reason == "stop" and res.token_ids == free[:5]
    assert res.text == "".join(f"<{t}>" for t in free[:3]) + "<"
    streamed = "".join(ev.text_delta for ev in eng.stream(prompts[0], SamplingParams(max_new_tokens=12,
                                                                                     ignore_eos=True, stop=(stop,))))
    assert streamed == res.text
    res = eng.generate(prompts, SamplingParams(max_new_tokens=12, stop_token_ids=(free[2],)))[0]
    assert res.finish_reason == "stop" and res.token_ids == free[:2] and res.completion_tokens == 3


def test_logprobs_are_the_models(model):
    prompt = _prompts([7])[0]
    res = Engine(model).generate([prompt], SamplingParams(max_new_tokens=3, ignore_eos=True, top_logprobs=2))[0]
    with torch.no_grad():
        full = model(torch.tensor([prompt + res.token_ids])).logits[0].float().log_softmax(-1)
    for i, lp in enumerate(res.logprobs):
        row = full[len(prompt) - 1 + i]
        assert abs(lp["logprob"] - float(row[res.token_ids[i]])) < 1e-4
        assert [t for t, _ in lp["top_logprobs"]] == row.topk(2).indices.tolist()


def test_cache_bytes_per_token_equal_accounting():
    for name in ("tiny", "small"):
        cfg = preset(name)
        for dtype, nb in ((torch.float32, 4), (torch.bfloat16, 2)):
            kv = KVCache(cfg, 1, 4, dtype=dtype, mtp=False)
            assert kv.bytes_per_token() == kv_cache_bytes_per_token(cfg, nb)


def test_errors_and_abort(model):
    eng = Engine(model, max_seq=16)
    with pytest.raises(ValueError, match="16 tokens but the context holds 16"):
        eng.generate([list(range(10, 26))], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.generate(["text"], SamplingParams())
    sched = eng.scheduler(max_batch=2)
    a = sched.add([10, 11, 12], SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = sched.add([13, 14], SamplingParams(max_new_tokens=5, ignore_eos=True))
    c = sched.add([15], SamplingParams(max_new_tokens=3, ignore_eos=True))
    sched.step()
    assert sched.num_running == 2 and sched.num_waiting == 1 and 0 < sched.cache_usage < 1
    assert sched.abort(a)
    assert sched.num_running == 1
    events = sched.step()
    assert any(e.request_id == a and e.finish_reason == "abort" for e in events)
    assert sched.num_running == 2  # c took a's row
    done = {}
    while sched.has_work():
        for e in sched.step():
            if e.finished:
                done[e.request_id] = e
    assert done[b].completion_tokens == 5 and done[c].completion_tokens == 3
    # the context limit ends a request with 'length'
    res = eng.generate([list(range(10, 24))], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert res.finish_reason == "length" and res.completion_tokens == 2


@pytest.mark.parametrize("changes", [
    dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=8),
    dict(hc_mult=2),
    dict(engram_layers=[0, 2], engram_dim_per_order=64, engram_heads_per_order=4, engram_table_size=[211, 307]),
], ids=["dsa", "mhc", "engram"])
def test_lever_configs_generate_like_full_forward(changes):
    m = _model(**changes)
    prompts = _prompts([12, 5])
    res = Engine(m, max_batch=2).generate(prompts, SamplingParams(max_new_tokens=14, ignore_eos=True))
    for prompt, r in zip(prompts, res):
        assert r.token_ids == _greedy_reference(m, prompt, 14)


def test_engine_backend_equals_naive_backend(tmp_path, model):
    from moonlet.data.tokenizer import train_tokenizer
    from moonlet.eval.backends import EngineBackend, GenParams, GenRequest, NaiveBackend
    from moonlet.eval.tasks import Prompt

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789"] * 20, vocab_size=300)
    m = CausalLM(preset("tiny").replace(vocab_size=tok.vocab_size)).init_weights(seed=2, std=0.05).eval()
    m.save_pretrained(tmp_path)
    tok.save(tmp_path)
    reqs = [GenRequest(Prompt(text=t), GenParams(max_new_tokens=12)) for t in ("the quick", "lazy dog 12", "fox")]
    reqs.append(GenRequest(Prompt.chat([{"role": "user", "content": "2+3?"}]), GenParams(max_new_tokens=12)))
    naive = NaiveBackend.from_pretrained(tmp_path).generate(reqs)
    engine = EngineBackend.from_pretrained(tmp_path).generate(reqs)
    assert engine == naive and any(naive)
