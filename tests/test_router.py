"""The DeepSeekMoE router on tiny tensors worked out by hand (spec section 3.2, checklist item 4).

Each test sets the router weight to the identity so the token vector *is* the logit vector; the
expected experts and weights below were computed on paper (sigmoid values to 7 digits), not by
running the code.
"""

import math

import pytest
import torch

from moonlet.config import ModelConfig
from moonlet.model.moe import Router


def make_router(E: int, K: int, G: int = 1, TG: int = 1, *, scaling: float = 2.5, norm: bool = True,
                scoring: str = "sigmoid", method: str = "noaux_tc") -> Router:
    cfg = ModelConfig(
        vocab_size=16, hidden_size=E, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=1,
        num_attention_heads=1, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
        v_head_dim=2, n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG,
        routed_scaling_factor=scaling, norm_topk_prob=norm, scoring_func=scoring, topk_method=method,
        first_k_dense_replace=0, num_nextn_predict_layers=0,
    ).validate()
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))  # logits = x
    return r


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def chosen(routing) -> dict[int, float]:
    """{expert: weight} of the single token routed."""
    return {int(i): float(w) for i, w in zip(routing.indices_NK[0], routing.weights_NK[0].detach())}


def test_bias_changes_selection_not_weights():
    # logits [2, 1, 0, -1] -> sigmoid [0.8807971, 0.7310586, 0.5, 0.2689414]; top-2, normalized, x 2.5
    r = make_router(E=4, K=2)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    got = chosen(r(x))
    # no bias: experts {0, 1}; 0.8807971 / 1.6118557 * 2.5 = 1.3661228, 0.7310586 / 1.6118557 * 2.5 = 1.1338772
    assert got.keys() == {0, 1}
    assert got[0] == pytest.approx(1.3661228, abs=1e-6) and got[1] == pytest.approx(1.1338772, abs=1e-6)

    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    got = chosen(r(x))
    # selection scores [0.881, 0.731, 1.0, 0.269] -> experts {0, 2}; weights from the UNBIASED scores:
    # 0.8807971 / 1.3807971 * 2.5 = 1.5947258, 0.5 / 1.3807971 * 2.5 = 0.9052742
    assert got.keys() == {0, 2}
    assert got[0] == pytest.approx(1.5947258, abs=1e-6) and got[2] == pytest.approx(0.9052742, abs=1e-6)
    # the bias moved the choice but not the scores the weights come from
    assert r(x).scores_NE[0, 2].item() == pytest.approx(0.5, abs=1e-7)


def test_normalized_weights_sum_to_routed_scaling_factor():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [-3.0, 0.5, 0.25, 4.0]])
    for scaling in (2.5, 2.827):
        w = make_router(E=4, K=2, scaling=scaling)(x).weights_NK
        torch.testing.assert_close(w.sum(-1), torch.full((2,), scaling), atol=1e-6, rtol=0)
    # without normalization the weights are the raw scores times the factor: 0.8807971 * 2.5, 0.7310586 * 2.5
    got = chosen(make_router(E=4, K=2, norm=False)(x[:1]))
    assert got[0] == pytest.approx(2.2019927, abs=1e-6) and got[1] == pytest.approx(1.8276464, abs=1e-6)


def group_token() -> torch.Tensor:
    # 8 experts in 4 groups of 2; sigmoid scores
    #   group 0: 0.95 0.05  (top-2 sum 1.00, max 0.95)
    #   group 1: 0.70 0.68  (sum 1.38)
    #   group 2: 0.66 0.64  (sum 1.30)
    #   group 3: 0.90 0.10  (sum 1.00, max 0.90)
    scores = [0.95, 0.05, 0.70, 0.68, 0.66, 0.64, 0.90, 0.10]
    return torch.tensor([[logit(p) for p in scores]])


def test_group_limit_uses_top2_sum():
    # keep the 2 groups with the best top-2 sums: groups 1 and 2 (1.38, 1.30), although groups 0 and 3
    # hold the two best single experts (0.95, 0.90) and a max-based rule would keep those.
    r = make_router(E=8, K=3, G=4, TG=2)
    got = chosen(r(group_token()))
    assert got.keys() == {2, 3, 4}
    # normalized over 0.70 + 0.68 + 0.66 = 2.04, x 2.5: 0.8578431, 0.8333333, 0.8088235
    assert got[2] == pytest.approx(0.8578431, abs=1e-6)
    assert got[3] == pytest.approx(0.8333333, abs=1e-6)
    assert got[4] == pytest.approx(0.8088235, abs=1e-6)
    # without the group limit (n_group 1) the plain top-3 is {0, 6, 2}
    assert chosen(make_router(E=8, K=3)(group_token())).keys() == {0, 6, 2}


def test_masked_groups_never_win_with_negative_biased_scores():
    # bias -1 everywhere makes every selection score negative. Masked groups are filled with -inf
    # (DeepSeek's reference); a 0.0 fill (HF) would let the masked experts outrank every kept one.
    r = make_router(E=8, K=3, G=4, TG=2)
    with torch.no_grad():
        r.e_score_correction_bias.fill_(-1.0)
    got = chosen(r(group_token()))
    assert got.keys() == {2, 3, 4}  # groups by top-2 sum: 1 (-0.62), 2 (-0.70) > 0, 3 (-1.00)
    assert got[2] == pytest.approx(0.8578431, abs=1e-6)  # a uniform bias changes nothing about the weights


def test_group_limited_greedy_softmax_uses_group_max():
    # DeepSeek-V2 style: softmax scores, group score = max, no renormalization.
    # logits ln[4, 1, 3, 3] -> softmax [4, 1, 3, 3] / 11; group max: g0 4/11 > g1 3/11 (while the sums
    # would favour g1: 6/11 > 5/11), so both picks come from group 0: experts 0 and 1, weights 4/11, 1/11.
    r = make_router(E=4, K=2, G=2, TG=1, scaling=1.0, norm=False, scoring="softmax",
                    method="group_limited_greedy")
    got = chosen(r(torch.tensor([[math.log(4), 0.0, math.log(3), math.log(3)]])))
    assert got.keys() == {0, 1}
    assert got[0] == pytest.approx(4 / 11, abs=1e-6) and got[1] == pytest.approx(1 / 11, abs=1e-6)
    # greedy (no groups) takes expert 0 and one of the 3/11 experts
    r = make_router(E=4, K=2, scaling=1.0, norm=False, scoring="softmax", method="greedy")
    got = chosen(r(torch.tensor([[math.log(4), 0.0, math.log(3), math.log(3)]])))
    assert 0 in got and got.keys() & {2, 3} and got[0] == pytest.approx(4 / 11, abs=1e-6)
