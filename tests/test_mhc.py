"""mHC: Sinkhorn gives doubly stochastic mixing, one stream with identity maps is the plain residual
block, gradients reach every mHC parameter and training lowers the loss, cached decode is exact."""

import math

import pytest
import torch

from moonlet.config import ConfigError, preset
from moonlet.model import CausalLM
from moonlet.model.block import allocate_cache
from moonlet.model.hyper import HyperConnection, mhc_extra_params, sinkhorn


def _model(**changes):
    return CausalLM(preset("tiny").replace(**changes)).init_weights(seed=1, std=0.05)


def test_sinkhorn_2x2_matches_closed_form():
    """A positive 2x2 matrix scales to [[x, 1-x], [1-x, x]] with (x / (1-x))^2 = m11 m22 / (m12 m21)."""
    R = torch.tensor([[0.3, -1.2], [0.8, 0.1]])
    r = math.exp(0.3 + 0.1 - (-1.2) - 0.8)
    x = math.sqrt(r) / (1 + math.sqrt(r))
    H = sinkhorn(R, iters=50, eps=0.0)
    assert torch.allclose(H, torch.tensor([[x, 1 - x], [1 - x, x]]), atol=1e-6)


def test_h_res_is_doubly_stochastic():
    """The maps every wrapper computes in a forward pass, with the dynamic part made 100x its init
    (alpha = 1 instead of 0.01; logit spread ~0.5): rows and columns of H_res sum to 1 within 1e-4
    after the configured 20 iterations, entries are non-negative; H_pre in (0,1), H_post in (0,2)."""
    m = _model(hc_mult=4).eval()
    seen = []
    for mod in m.modules():
        if isinstance(mod, HyperConnection):
            with torch.no_grad():
                mod.scale.fill_(1.0)
            mod.maps = (lambda f: lambda X: seen.append(f(X)) or seen[-1])(mod.maps)
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    with torch.no_grad():
        m(ids)
    assert len(seen) == 2 * m.config.num_hidden_layers
    for pre, post, res in seen:
        assert res.shape == (2, 16, 4, 4) and (res >= 0).all()
        assert (res.sum(-1) - 1).abs().max() <= 1e-4
        assert (res.sum(-2) - 1).abs().max() <= 1e-4
        assert res.std(dim=(0, 1)).mean() > 0.01  # really input-dependent
        assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()


def test_init_starts_near_identity():
    hc = HyperConnection(preset("tiny").replace(hc_mult=4))
    X = torch.randn(1, 3, 4, 192)
    pre, post, res = hc.maps(X)
    assert (pre - 0.25).abs().max() < 0.05  # reads the mean of the streams
    assert (post - 1).abs().max() < 0.05  # writes the output once into each stream
    diag = res.diagonal(dim1=-2, dim2=-1)
    assert (diag > 0.45).all() and (res.sum(-1) - 1).abs().max() < 1e-5  # favours its own stream
    same = X[:, :, :1].expand(-1, -1, 4, -1)  # identical streams (as at the embedding) pass unchanged
    assert torch.allclose(HyperConnection.write(same, torch.zeros(1, 3, 192), post, res), same, atol=1e-5)


def test_sinkhorn_converges_with_iterations():
    """Harder (wider-spread) logits need more iterations; the error falls monotonically."""
    torch.manual_seed(0)
    R = torch.randn(500, 4, 4) * 1.5
    errs = []
    for it in (5, 20, 200):
        H = sinkhorn(R, it, 1e-6)
        errs.append(max((H.sum(-1) - 1).abs().max().item(), (H.sum(-2) - 1).abs().max().item()))
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-4, errs


def test_one_stream_identity_maps_equal_plain_residual_exactly():
    """hc_mult = 1 with identity maps (no dynamics, H_pre = H_post = H_res = 1): bit-identical logits
    and losses to the model without mHC on the same weights, with and without a cache."""
    m = _model(hc_mult=1).eval()
    for mod in m.modules():
        if isinstance(mod, HyperConnection):
            mod.set_identity_()
    plain = CausalLM(preset("tiny")).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "_hc." not in k})
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = m(ids, labels=ids, run_mtp=True), plain(ids, labels=ids, run_mtp=True)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        assert torch.equal(a.mtp_logits[0], b.mtp_logits[0])
        ca, cb = allocate_cache(m.config, 2, 32), allocate_cache(plain.config, 2, 32)
        pos = torch.arange(24).expand(2, 24)
        assert torch.equal(m(ids, positions=pos, cache=ca).logits, plain(ids, positions=pos, cache=cb).logits)


def test_training_steps_lower_the_loss_and_reach_every_mhc_parameter():
    m = _model(hc_mult=4, num_nextn_predict_layers=0).train()
    ids = torch.randint(0, m.config.vocab_size, (4, 32))
    out = m(ids, labels=ids)
    out.loss.backward()
    for name, p in m.named_parameters():
        if "_hc." in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_cached_decode_equals_full_forward():
    m = _model(hc_mult=3).eval()
    B, T = 2, 20
    ids = torch.randint(0, m.config.vocab_size, (B, T))
    cache = allocate_cache(m.config, B, 24)
    with torch.no_grad():
        full = m(ids).logits
        steps = [m(ids[:, :4], positions=torch.arange(4).expand(B, 4), cache=cache).logits]
        for t in range(4, T):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_config_and_param_accounting():
    cfg = preset("tiny").replace(hc_mult=4, hc_sinkhorn_iters=10, hc_eps=1e-8)
    d = cfg.to_hf_dict()
    assert d["model_type"] == "moonlet" and d["moonlet_base_model_type"] == "deepseek_v3"
    assert (d["hc_mult"], d["hc_sinkhorn_iters"], d["hc_eps"]) == (4, 10, 1e-8)
    back = type(cfg).from_hf_dict(d)
    assert back.to_hf_dict() == d and back.model_type == "deepseek_v3" and back.hc_mult == 4
    assert "hc_mult" not in preset("tiny").to_hf_dict()
    with pytest.raises(ConfigError, match="hc_mult"):
        preset("tiny").replace(hc_mult=0)
    m = CausalLM(cfg)
    counted = sum(p.numel() for n, p in m.named_parameters() if "_hc." in n)
    extra = mhc_extra_params(cfg)
    assert counted == extra["main"] + extra["mtp"]
    n, C = 4, 192
    assert extra["per_sublayer"] == (n * n + 2 * n) * (n * C + 1) + 3
