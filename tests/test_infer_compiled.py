"""The compiled batch-1 decode step (infer/compiled.py) is the model's own forward: the same logits
as a full forward over several cached steps of growing length (one compile serves them all), with
float weights (folded and unfolded absorption, plain q, half-split RoPE) and with INT8 weights (against
the model holding their dequantized values); an engine built with compile=True generates what the
fast path generates."""

import copy

import pytest
import torch

from moonlet.config import preset
from moonlet.infer import Engine, SamplingParams
from moonlet.infer.cache import KVCache
from moonlet.infer.compiled import CompiledDecode
from moonlet.infer.fastpath import FastForward
from moonlet.model import CausalLM
from moonlet.model.quant import QuantWeight, quantize_model


def _steps_match(m: CausalLM, ref: CausalLM, tol: float, n_steps: int = 4) -> None:
    comp = CompiledDecode(FastForward(m))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, m.config.vocab_size, (1, 9), generator=g)
    kv = KVCache(m.config, 1, 32, mtp=False)
    with torch.no_grad():
        ref(seq, positions=torch.arange(9)[None], cache=kv.view(0, 1))  # the prompt's cache, exactly
        for _ in range(n_steps):
            tok = torch.randint(0, m.config.vocab_size, (1, 1), generator=g)
            logits, hidden = comp(tok, torch.tensor([[seq.shape[1]]]), kv.view(0, 1))
            seq = torch.cat((seq, tok), 1)
            out = ref(seq)
            want = out.logits[0, -1].float()
            assert logits.shape == (1, 1, m.config.vocab_size) and logits.dtype == torch.float32
            assert (logits[0, 0] - want).abs().max() <= tol * max(1.0, float(want.abs().max()))
            assert (hidden[0, 0].float() - out.hidden[0, -1].float()).abs().max() <= tol * 10


@pytest.mark.parametrize("changes", [{}, {"kv_lora_rank": 256, "q_lora_rank": None, "rope_interleave": False}],
                         ids=["folded", "unfolded_no_qlora_half_rope"])
def test_compiled_steps_equal_model_forward(changes):
    m = CausalLM(preset("tiny").replace(**changes)).init_weights(seed=1, std=0.05).eval()
    _steps_match(m, m, 1e-4)


def test_compiled_batch_of_ragged_rows_equals_model_forward():
    """Rows at different positions (9, 5 and 7 cached tokens; 3, then 2 rows: one graph for every batch
    size >= 2), then 2 tokens of one row (a verify step): attention masked past each query's position."""
    m = CausalLM(preset("tiny")).init_weights(seed=4, std=0.05).eval()
    comp = CompiledDecode(FastForward(m))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, m.config.vocab_size, (1, n), generator=g) for n in (9, 5, 7)]
    kv = KVCache(m.config, 3, 32, mtp=False)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            m(s, positions=torch.arange(s.shape[1])[None], cache=kv.view(i, i + 1))
        for rows, T in ((3, 1), (2, 1), (1, 2)):  # T = 2: a speculative verify step
            tok = torch.randint(0, m.config.vocab_size, (rows, T), generator=g)
            pos = torch.stack([s.shape[1] + torch.arange(T) for s in seqs[:rows]])
            logits, _ = comp(tok, pos, kv.view(0, rows))
            assert logits.shape == (rows, T, m.config.vocab_size)
            for i in range(rows):
                seqs[i] = torch.cat((seqs[i], tok[i:i + 1]), 1)
                assert (logits[i] - m(seqs[i]).logits[0, -T:]).abs().max() <= 1e-4


def test_compiled_mtp_equals_fast_path():
    m = CausalLM(preset("tiny")).init_weights(seed=5, std=0.05).eval()
    fast = FastForward(m)
    comp = CompiledDecode(fast)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, m.config.vocab_size, (1, 8), generator=g)
    L = m.config.num_hidden_layers
    kv_a, kv_b = KVCache(m.config, 1, 32, mtp=True), KVCache(m.config, 1, 32, mtp=True)
    with torch.no_grad():
        _, hidden = fast(ids, torch.arange(8)[None], kv_a.view(0, 1), last_only=False, fresh=True)
        fast.mtp(hidden[:, :6], ids[:, 1:7], torch.arange(6)[None], kv_a.view(0, 1), fresh=True)
        kv_b.layers[L].latent.copy_(kv_a.layers[L].latent)
        pos, nxt = torch.tensor([[6, 7]]), torch.randint(0, m.config.vocab_size, (1, 2), generator=g)
        want = fast.mtp(hidden[:, 6:], nxt, pos, kv_a.view(0, 1))
        got = comp.mtp(hidden[:, 6:], nxt, pos, kv_b.view(0, 1))
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
        assert (kv_b.layers[L].latent - kv_a.layers[L].latent).abs().max() <= 1e-5


def test_compiled_speculative_greedy_is_greedy():
    """MTP drafts (k = 1) verified by the compiled T = 2 step, the MTP graph catching up: exactly greedy."""
    m = CausalLM(preset("tiny")).init_weights(seed=6, std=0.05).eval()
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    want = Engine(m).generate([[1, 5, 9, 200, 31]], params)[0].token_ids
    got = Engine(m, speculative=1, compile=True).generate([[1, 5, 9, 200, 31]], params)[0]
    assert got.token_ids == want and got.spec_accept_rate is not None


def test_fused_greedy_round_equals_verify_then_mtp():
    """One graph call per greedy round (CompiledDecode.greedy_round) == the unfused round on the fast
    path: verify [pending, draft], accept while the draft is the argmax, MTP over both positions,
    draft from the last accepted one. Two rows at different lengths: row 0's draft is the target's
    argmax (accepted), row 1's is not (rejected)."""
    m = CausalLM(preset("tiny")).init_weights(seed=8, std=0.05).eval()
    ff = FastForward(m)
    g = torch.Generator().manual_seed(1)
    lens = [9, 6]
    kv = KVCache(m.config, 2, 32, mtp=True)
    with torch.no_grad():
        for i, n in enumerate(lens):  # prompts; the MTP slots hold something, as after prefill
            ids = torch.randint(3, m.config.vocab_size, (1, n), generator=g)
            _, h = ff(ids, torch.arange(n)[None], kv.view(i, i + 1), last_only=False, fresh=True)
            ff.mtp(h, torch.randint(3, m.config.vocab_size, (1, n), generator=g), torch.arange(n)[None],
                   kv.view(i, i + 1), fresh=True)
        pending = torch.randint(3, m.config.vocab_size, (2, 1), generator=g)
        pos = torch.tensor(lens)[:, None] + torch.arange(2)[None]
        probe = copy.deepcopy(kv)
        first, _ = ff(torch.cat((pending, pending), 1), pos, probe.view(0, 2), last_only=False)
        right = first[0, 0].argmax()
        x = torch.cat((pending, torch.stack((right, (first[1, 0].argmax() + 1) % m.config.vocab_size))[:, None]), 1)
        ref_kv = copy.deepcopy(kv)
        logits, hidden = ff(x, pos, ref_kv.view(0, 2), last_only=False)
        want_target = logits.argmax(-1)
        h = ff.mtp(hidden, want_target, pos, ref_kv.view(0, 2))
        want_draft = m.lm_head(h[torch.arange(2), torch.tensor([1, 0])]).argmax(-1)
        target, accepted, draft = CompiledDecode(ff).greedy_round(x, pos, kv.view(0, 2))
    assert accepted.tolist() == [1, 0]
    assert torch.equal(target, want_target) and torch.equal(draft, want_draft)
    for layer, (a, b) in enumerate(zip(kv.view(0, 2), ref_kv.view(0, 2))):  # main and MTP slots written alike
        assert (a.latent[:, :lens[0] + 2] - b.latent[:, :lens[0] + 2]).abs().max() <= 1e-4, layer


def test_compiled_speculative_batch_is_greedy():
    """Ragged prompts decoded together by fused greedy rounds, rows leaving the batch: greedy's tokens."""
    m = CausalLM(preset("tiny")).init_weights(seed=9, std=0.05).eval()
    prompts = [[1, 5, 9, 200, 31], [7, 7, 8], [40, 41, 42, 43, 44, 45, 46]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 9)]
    want = [r.token_ids for r in Engine(m, max_batch=4).generate(prompts, params)]
    got = Engine(m, max_batch=4, speculative=1, compile=True).generate(prompts, params)
    assert [r.token_ids for r in got] == want


def _dequantized_copy(m: CausalLM) -> CausalLM:
    """The float model whose weights are the INT8 model's dequantized values."""
    ref = copy.deepcopy(m)
    quantize_model(m, "int8")
    for name, mod in m.named_modules():
        if isinstance(mod, QuantWeight):
            parent, _, attr = name.rpartition(".")
            target = getattr(ref.get_submodule(parent), attr)
            w = target.weight if isinstance(target, torch.nn.Linear) else target
            w.data = mod.dequantize(torch.float32)
    return ref


def test_compiled_int8_equals_dequantized_model():
    m = CausalLM(preset("tiny")).init_weights(seed=2, std=0.05).eval()
    ref = _dequantized_copy(m)
    assert any(isinstance(mod, QuantWeight) for mod in m.modules())
    _steps_match(m, ref, 1e-4)


def test_engine_compile_generates_the_fast_paths_tokens():
    """Through the scheduler: ragged prompts decoded together, sequences leaving the batch (3 -> 2 -> 1 rows)."""
    m = CausalLM(preset("tiny")).init_weights(seed=3, std=0.05).eval()
    prompts = [[1, 5, 9, 200, 31], [7, 7, 8], [40, 41, 42, 43, 44, 45, 46]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 9)]
    want = [r.token_ids for r in Engine(m, max_batch=4).generate(prompts, params)]
    got = [r.token_ids for r in Engine(m, max_batch=4, compile=True).generate(prompts, params)]
    assert got == want and [len(t) for t in got] == [6, 3, 9]


def test_compiled_bf16_step_within_bf16_rounding():
    m = CausalLM(preset("tiny")).init_weights(seed=7, std=0.05).to(torch.bfloat16).eval()
    fast = FastForward(m)
    comp = CompiledDecode(fast)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), generator=g)
    kv_a, kv_b = (KVCache(m.config, 1, 32, dtype=torch.bfloat16, mtp=False) for _ in range(2))
    with torch.no_grad():
        fast(ids, torch.arange(9)[None], kv_a.view(0, 1), fresh=True)
        for a, b in zip(kv_a.layers, kv_b.layers):  # the same prompt cache in both
            b.latent.copy_(a.latent)
        for pos in (9, 10):
            tok = torch.randint(0, m.config.vocab_size, (1, 1), generator=g)
            want, _ = fast(tok, torch.tensor([[pos]]), kv_a.view(0, 1))
            got, hidden = comp(tok, torch.tensor([[pos]]), kv_b.view(0, 1))
            assert hidden.dtype == torch.bfloat16 and kv_b.layers[0].latent.dtype == torch.bfloat16
            assert (got[0, 0] - want[0, 0].float()).abs().max() <= 0.03 * float(want.float().abs().max())


def test_int4_is_refused():
    m = CausalLM(preset("tiny")).init_weights(seed=0).eval()
    quantize_model(m, "int4")
    with pytest.raises(ValueError, match="INT4"):
        Engine(m, compile=True)


def test_a_failed_compile_says_so(monkeypatch):
    """E.g. no C++ compiler for inductor: one clear error naming the way out, not inductor's traceback."""
    m = CausalLM(preset("tiny")).init_weights(seed=0).eval()
    comp = CompiledDecode(FastForward(m))

    def broken(*args):
        raise OSError("g++ not found")

    monkeypatch.setattr(comp, "_compile", lambda name: broken)
    kv = KVCache(m.config, 1, 8, mtp=False)
    with pytest.raises(RuntimeError, match="compiling the decode graph failed .*g\\+\\+ not found.*--compile"):
        comp(torch.tensor([[3]]), torch.tensor([[2]]), kv.view(0, 1))
