"""MTP speculative decoding: greedy output is exactly greedy decoding (whatever the drafts are),
rejection sampling leaves the sampling distribution unchanged, acceptance is reported."""

import pytest
import torch

from moonlet.config import preset
from moonlet.infer import Engine, SamplingParams
from moonlet.infer import speculative
from moonlet.infer.sampling import SamplerState
from moonlet.model import CausalLM


@pytest.fixture(scope="module")
def model():
    return CausalLM(preset("tiny")).init_weights(seed=1, std=0.05).eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 4096, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_is_exactly_greedy(model, k, monkeypatch):
    prompts = _prompts([9, 4, 15])
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    plain = Engine(model, max_batch=3).generate(prompts, sp)
    # a random model's MTP is never right; replace every other draft by the true continuation so
    # full, partial and zero acceptance all happen
    truth = {tuple(p): r.token_ids for p, r in zip(prompts, plain)}
    real_draft = speculative._draft
    calls = {"n": 0}

    def oracle_draft(sched, reqs, h, pos, rows):
        real_draft(sched, reqs, h, pos, rows)
        calls["n"] += 1
        for r in reqs:
            done = r.output_ids
            want = truth[tuple(r.prompt_ids)][len(done):len(done) + k]
            for j in range(min(len(want), k)):
                if (calls["n"] + j) % 3:
                    r.draft[j] = want[j]

    monkeypatch.setattr(speculative, "_draft", oracle_draft)
    eng = Engine(model, max_batch=2, speculative=k)
    spec = eng.generate(prompts, sp)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.completion_tokens == 16
        assert 0 < b.spec_accept_rate < 1


def test_greedy_speculative_with_the_real_mtp(model):
    prompts = _prompts([6, 10])
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    plain = Engine(model).generate(prompts, sp)
    spec = Engine(model, speculative=2).generate(prompts, sp)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.spec_accept_rate is not None for r in spec)


@pytest.mark.parametrize("k", [1, 2])
def test_rejection_sampling_keeps_the_distribution(k):
    """Tiny vocabulary, draft distribution q far from target p: the first two produced tokens must
    follow p (and p given the first) -- TV distance within a fixed tolerance over 20k trials."""
    V, N = 5, 20000
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p1 = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])  # target after any first token
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    target = torch.stack([p0.log()] + [p1.log()] * k)  # [k+1, V]: after pending, after d_1, ...
    st = SamplerState(SamplingParams(temperature=1.0, seed=0), [], V)
    g = torch.Generator().manual_seed(1)
    first = torch.zeros(V)
    second = torch.zeros(V)
    n_second = 0
    for _ in range(N):
        drafts = torch.multinomial(q, k, replacement=True, generator=g).tolist()
        toks, a = speculative.verify(target, drafts, [q] * k, st)
        assert len(toks) == a + 1
        first[toks[0]] += 1
        if len(toks) > 1:
            second[toks[1]] += 1
            n_second += 1
    assert 0.5 * (first / N - p0).abs().sum() < 0.015
    assert n_second > 1000 and 0.5 * (second / n_second - p1).abs().sum() < 0.03


def test_sampled_speculative_runs_and_is_seeded(model):
    prompts = _prompts([5])
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    eng = Engine(model, speculative=2)
    a = eng.generate(prompts, sp)[0]
    b = eng.generate(prompts, sp)[0]
    assert a.token_ids == b.token_ids and a.completion_tokens == 12


def test_speculative_needs_mtp():
    m = CausalLM(preset("tiny").replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        Engine(m, speculative=1)
