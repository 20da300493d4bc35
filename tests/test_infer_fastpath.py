"""The inference fast path (folded absorption, one-mask decode attention, per-expert MoE loop) is
the model's own forward: same logits on fresh prefills, ragged decode and multi-token verify steps."""

import pytest
import torch

from moonlet.config import preset
from moonlet.infer.cache import KVCache
from moonlet.infer.fastpath import FastForward
from moonlet.model import CausalLM


@pytest.mark.parametrize("changes", [{}, {"kv_lora_rank": 256}, {"q_lora_rank": None},
                                     {"rope_interleave": False, "n_shared_experts": None}],
                         ids=["folded", "unfolded", "no_qlora", "half_rope_no_shared"])
@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_fast_path_equals_model_forward(changes, form):
    m = CausalLM(preset("tiny").replace(**changes)).init_weights(seed=1, std=0.05).eval()
    fast = FastForward(m)
    fast.prefill_form = form
    # exercise all three MoE dispatches: the 13-token prefill's 26 pairs through grouped_mm, the 3-token
    # step over 2 rows (12 pairs) through the per-expert loop, 1-2 rows per token
    fast.loop_max_pairs, fast.per_token_max_rows = 16, 2
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 4096, (1, n), generator=g) for n in (13, 6))
    kv = KVCache(m.config, 2, 32, mtp=False)
    with torch.no_grad():
        la, _ = fast(a, torch.arange(13)[None], kv.view(0, 1), fresh=True)
        lb, _ = fast(b, torch.arange(6)[None], kv.view(1, 2), fresh=True)
        assert (la[0, -1] - m(a).logits[0, -1]).abs().max() <= 1e-4
        assert (lb[0, -1] - m(b).logits[0, -1]).abs().max() <= 1e-4
        # ragged decode: row 0 at position 13, row 1 at 6; then a 3-token step on both rows
        nxt = torch.tensor([[7], [9]])
        ld, _ = fast(nxt, torch.tensor([[13], [6]]), kv.view(0, 2))
        assert (ld[0, -1] - m(torch.cat((a, nxt[:1]), 1)).logits[0, -1]).abs().max() <= 1e-4
        assert (ld[1, -1] - m(torch.cat((b, nxt[1:]), 1)).logits[0, -1]).abs().max() <= 1e-4
        three = torch.randint(0, 4096, (2, 3), generator=g)
        lv, _ = fast(three, torch.tensor([[14, 15, 16], [7, 8, 9]]), kv.view(0, 2), last_only=False)
        full_a = m(torch.cat((a, nxt[:1], three[:1]), 1)).logits[0, -3:]
        full_b = m(torch.cat((b, nxt[1:], three[1:]), 1)).logits[0, -3:]
        assert (lv[0] - full_a).abs().max() <= 1e-4 and (lv[1] - full_b).abs().max() <= 1e-4
        # one token of one row (the batch-1 decode: Python router, no mask, slice cache write)
        one = torch.tensor([[5]])
        l1, _ = fast(one, torch.tensor([[17]]), kv.view(0, 1))
        full_1 = m(torch.cat((a, nxt[:1], three[:1], one), 1)).logits[0, -1]
        assert (l1[0, -1] - full_1).abs().max() <= 1e-4


def test_levers_are_refused():
    with pytest.raises(ValueError, match="plain MLA"):
        FastForward(CausalLM(preset("tiny").replace(hc_mult=2)))


def test_fold_rule():
    from moonlet.infer.fastpath import _Attn

    folded = _Attn(CausalLM(preset("tiny")).model.layers[0].self_attn)
    unfolded = _Attn(CausalLM(preset("tiny").replace(kv_lora_rank=256)).model.layers[0].self_attn)
    assert folded.fold_q and folded.fold_o and not unfolded.fold_q and not unfolded.fold_o


def test_fast_mtp_equals_mtp_module():
    from moonlet.model.transformer import make_context

    m = CausalLM(preset("tiny")).init_weights(seed=1, std=0.05).eval()
    fast = FastForward(m)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 7, m.config.hidden_size, generator=g)
    nxt = torch.randint(0, 4096, (1, 7), generator=g)
    kv = KVCache(m.config, 1, 16, mtp=True)
    with torch.no_grad():
        ctx = make_context(m.model.rotary, torch.arange(7)[None], h.dtype, with_cache=False, absorbed=False)
        ref, _ = m.mtp[0](h, m.model.embed_tokens(nxt), ctx)
        first = fast.mtp(h[:, :6], nxt[:, :6], torch.arange(6)[None], kv.view(0, 1), fresh=True)
        step = fast.mtp(h[:, 6:], nxt[:, 6:], torch.tensor([[6]]), kv.view(0, 1))
    assert (torch.cat((first, step), 1) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("upcast_rows", [0, 64], ids=["native_bf16", "fp32_for_many_rows"])
def test_bf16_fast_path_tracks_the_fp32_model(upcast_rows, monkeypatch):
    """bf16 weights and cache (decode attention in fp32 on CPU; prefill products of >= 64 rows in fp32
    on CPUs without native bf16): prefill + decode logits stay within bf16 rounding of the fp32 model."""
    from moonlet.infer import fastpath

    monkeypatch.setattr(fastpath, "UPCAST_ROWS", upcast_rows)
    m32 = CausalLM(preset("tiny")).init_weights(seed=1, std=0.05).eval()
    m16 = CausalLM(preset("tiny")).init_weights(seed=1, std=0.05).eval().to(torch.bfloat16)
    fast = FastForward(m16)
    P, n = 70, 4
    ids = torch.randint(0, 4096, (1, P + n), generator=torch.Generator().manual_seed(0))
    kv = KVCache(m16.config, 1, P + n, dtype=torch.bfloat16, mtp=False)
    with torch.no_grad():
        full = m32(ids).logits[0]
        lp, _ = fast(ids[:, :P], torch.arange(P)[None], kv.view(0, 1), fresh=True)
        steps = [lp[0, -1]]
        for t in range(P, P + n):
            ld, _ = fast(ids[:, t:t + 1], torch.tensor([[t]]), kv.view(0, 1))
            steps.append(ld[0, -1])
    got = torch.stack(steps[:-1]).float()
    ref = full[P - 1:P + n - 1]
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()  # measured 0.012: bf16 has 8 mantissa bits


@pytest.mark.parametrize("changes", [{}, {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
                                     {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1},
                                     {"scoring_func": "softmax", "topk_method": "group_limited_greedy"}],
                         ids=["noaux_tc_groups", "no_norm_scaled", "softmax_greedy", "group_limited_greedy"])
def test_one_token_router_equals_router(changes):
    """The batch-1 router (Python over the E scores) picks the same experts with the same weights
    as Router.forward, including a non-zero correction bias that changes the choice."""
    from moonlet.infer.fastpath import _Route

    cfg = preset("tiny").replace(**{"n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
                                    **changes})
    gate = CausalLM(cfg).init_weights(seed=2, std=0.5).model.layers[-1].mlp.gate
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.3)
    route = _Route(gate)
    x = torch.randn(200, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = gate(x)
        for n in range(200):
            got = dict(route(x[n:n + 1])[0])
            want = dict(zip(ref.indices_NK[n].tolist(), ref.weights_NK[n].tolist()))
            assert got.keys() == want.keys()
            # (a 1-row and a 200-row GEMM sum in different orders: logits differ by fp32 rounding)
            assert all(abs(got[e] - want[e]) <= 1e-5 * max(1.0, abs(want[e])) for e in want)
