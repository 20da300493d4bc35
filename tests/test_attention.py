"""MLA's two forms (naive per-head K/V and absorbed latent attention) are the same function."""

import pytest
import torch

from moonlet.config import preset
from moonlet.model import CausalLM, LayerCache


def _model(**changes):
    cfg = preset("tiny").replace(**changes)
    return CausalLM(cfg).init_weights(seed=1, std=0.05).eval()


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"rope_interleave": False},
                                     {"rope_scaling": {"type": "yarn", "factor": 8.0,
                                                       "original_max_position_embeddings": 256,
                                                       "mscale": 1.0, "mscale_all_dim": 1.0}}])
def test_absorbed_equals_naive(changes):
    m = _model(**changes)
    ids = torch.randint(0, m.config.vocab_size, (2, 48))
    with torch.no_grad():
        naive = m(ids, absorbed=False).logits
        absorbed = m(ids, absorbed=True).logits
    assert (naive - absorbed).abs().max().item() <= 1e-5


@pytest.mark.parametrize("absorbed", [True, False])
def test_cache_filled_token_by_token_equals_full_forward(absorbed):
    m = _model()
    cfg = m.config
    B, T, P = 2, 40, 7
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = [LayerCache(torch.zeros(B, 64, width)) for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        full = m(ids).logits
        steps = [m(ids[:, :P], positions=torch.arange(P).expand(B, P), cache=cache, absorbed=absorbed).logits]
        for t in range(P, T):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache, absorbed=absorbed).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_ragged_positions_share_one_cache():
    """Two sequences at different lengths decode in one batch: each sees only its own slots."""
    m = _model()
    cfg = m.config
    a = torch.randint(0, cfg.vocab_size, (1, 12))
    b = torch.randint(0, cfg.vocab_size, (1, 5))
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    with torch.no_grad():
        ref_a = m(a).logits[:, -1]
        ref_b = m(b).logits[:, -1]
        cache = [LayerCache(torch.zeros(2, 16, width)) for _ in range(cfg.num_hidden_layers)]
        ids = torch.zeros(2, 11, dtype=torch.long)
        ids[0], ids[1, :4] = a[0, :11], b[0, :4]
        m(ids, positions=torch.arange(11).expand(2, 11), cache=cache, absorbed=False)
        nxt = torch.stack([a[0, 11], b[0, 4]])[:, None]
        out = m(nxt, positions=torch.tensor([[11], [4]]), cache=cache).logits[:, -1]
    assert (out[0] - ref_a[0]).abs().max() <= 1e-5
    assert (out[1] - ref_b[0]).abs().max() <= 1e-5
