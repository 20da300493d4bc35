"""Muon's update (NS5 band, RMS matching, per-expert orthogonalisation), parameter groups, QK-clip."""

import math

import pytest
import torch

from moonlet.config import preset
from moonlet.model import CausalLM
from moonlet.model.attention import MLA
from moonlet.train.optim import NS_COEFFS, Muon, QKClip, build_optimizer, classify, newton_schulz5, qk_clip_


def _ns_band(lo: float, hi: float, steps: int = 5) -> tuple[float, float]:
    """Where the scalar NS5 map sends singular values in [lo, hi] (NS acts on each one separately)."""
    a, b, c = NS_COEFFS
    x = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return float(x.min()), float(x.max())


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 48, 96)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_newton_schulz_singular_values_in_band(shape, dtype, tol):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    s_in = torch.linalg.svdvals(G.double())  # [..., min(A,B)]
    s_in = s_in / torch.linalg.vector_norm(G.double(), dim=(-2, -1))[..., None]
    lo, hi = _ns_band(float(s_in.min()), float(s_in.max()))
    s_out = torch.linalg.svdvals(newton_schulz5(G, dtype=dtype).double())
    assert 0.6 < lo and hi < 1.25  # the band Muon relies on ("S' ~ Uniform(0.5, 1.5)" in Moonlight's comment)
    assert float(s_out.min()) >= lo - tol and float(s_out.max()) <= hi + tol
    # orthogonal-ish: the output's rows (or columns) are near-orthonormal
    O = newton_schulz5(G, dtype=torch.float32).double()
    gram = O @ O.mT if shape[-2] <= shape[-1] else O.mT @ O
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    assert float((gram - eye).abs().max()) < max(1 - lo ** 2, hi ** 2 - 1) + 1e-3


def test_muon_update_is_rms_matched_and_per_expert():
    """One Muon step moves each matrix by lr * 0.2*sqrt(max(A,B)) * NS(G): update RMS ~0.2 for every shape,
    and a 3-D expert stack is orthogonalised expert by expert."""
    torch.manual_seed(0)
    shapes = [(64, 256), (256, 64), (96, 96 * 3), (6, 32, 80)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    grads[-1][0] *= 100.0  # one expert with a huge gradient must not swamp the others
    for p, g in zip(params, grads):
        p.grad = g.clone()
    lr = 0.01
    opt = Muon([{"params": params, "use_muon": True}], lr=lr, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float32)
    opt.step()
    for p, g, shape in zip(params, grads, shapes):
        delta = -p.detach().double() / lr  # = 0.2 sqrt(max(A,B)) NS(G)
        s_in = torch.linalg.svdvals(g.double()) / torch.linalg.vector_norm(g.double(), dim=(-2, -1))[..., None]
        lo, hi = _ns_band(float(s_in.min()), float(s_in.max()))
        scale = 0.2 * math.sqrt(max(shape[-2], shape[-1]))
        sv = torch.linalg.svdvals(delta) / scale
        assert float(sv.min()) >= lo - 1e-3 and float(sv.max()) <= hi + 1e-3, shape
        rms = float(delta.pow(2).mean(dim=(-2, -1)).sqrt().min()), float(delta.pow(2).mean(dim=(-2, -1)).sqrt().max())
        assert 0.2 * lo - 1e-3 <= rms[0] and rms[1] <= 0.2 * hi + 1e-3, (shape, rms)


def test_muon_nesterov_momentum_and_weight_decay():
    """Second step: the orthogonalised direction is G2 + mu*(mu*G1 + G2); decay multiplies W by (1 - lr*wd)."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 32)
    p = torch.nn.Parameter(w0.clone())
    g1, g2 = torch.randn(16, 32), torch.randn(16, 32)
    lr, wd, mu = 0.05, 0.1, 0.95
    opt = Muon([{"params": [p], "use_muon": True}], lr=lr, weight_decay=wd, momentum=mu, ns_dtype=torch.float32)
    scale = 0.2 * math.sqrt(32)
    expect = w0 * (1 - lr * wd) - lr * scale * newton_schulz5(g1 + mu * g1, dtype=torch.float32)
    p.grad = g1.clone()
    opt.step()
    assert torch.allclose(p.detach(), expect, atol=1e-6)
    buf = mu * g1 + g2
    expect = expect * (1 - lr * wd) - lr * scale * newton_schulz5(g2 + mu * buf, dtype=torch.float32)
    p.grad = g2.clone()
    opt.step()
    assert torch.allclose(p.detach(), expect, atol=1e-6)


def test_param_groups():
    model = CausalLM(preset("tiny"))
    groups = {k: {n for n, _ in v} for k, v in classify(model, use_muon=True).items()}
    assert "model.embed_tokens.weight" in groups["no_decay"] and "lm_head.weight" in groups["decay"]
    assert "model.layers.1.mlp.experts.gate_proj" in groups["muon"]  # 3-D experts: Muon, per expert
    assert "model.layers.1.mlp.gate.weight" in groups["muon"]  # router [E, D]: a matrix like the others
    assert "mtp.0.eh_proj.weight" in groups["muon"]
    assert "model.layers.0.self_attn.q_b_proj.weight" in groups["muon"]
    assert all(p.ndim == 1 for n, p in model.named_parameters() if n in groups["no_decay"] and "embed" not in n)
    n_all = len(list(model.parameters()))
    assert sum(map(len, groups.values())) == n_all
    adamw = {k: {n for n, _ in v} for k, v in classify(model, use_muon=False).items()}
    assert not adamw["muon"] and "model.layers.1.mlp.experts.gate_proj" in adamw["decay"]
    assert "model.norm.weight" in adamw["no_decay"] and "model.embed_tokens.weight" in adamw["no_decay"]
    # frozen parameters (e.g. a DSA indexer warm-up stage) stay out of the optimizer
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("lm_head"))
    opt = build_optimizer(model, "muonclip")
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


def test_mhc_parameters_go_to_adamw():
    """mHC's coefficient matrices `fn` are matrices but not Muon's (the mHC paper trains them with AdamW):
    fn decayed, base/scale not; the sublayers they wrap keep Muon."""
    model = CausalLM(preset("tiny").replace(hc_mult=4))
    named = dict(model.named_parameters())
    hc = [n for n in named if ".fn" in n or n.endswith((".base", ".scale"))]
    assert any(n.endswith(".fn") for n in hc) and len(hc) % 3 == 0
    groups = {k: {n for n, _ in v} for k, v in classify(model, use_muon=True).items()}
    assert not [n for n in hc if n in groups["muon"]]
    assert {n for n in hc if n.endswith(".fn")} <= groups["decay"]
    assert {n for n in hc if not n.endswith(".fn")} <= groups["no_decay"]
    assert "model.layers.0.self_attn.q_b_proj.weight" in groups["muon"]
    opt = build_optimizer(model, "muonclip")
    fn_name = next(n for n in hc if n.endswith(".fn"))
    g = next(g for g in opt.param_groups if fn_name in g["names"])
    assert not g["use_muon"] and g["weight_decay"] > 0


# ---- QK-clip ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _scaled_logits(attn: MLA, x: torch.Tensor) -> torch.Tensor:
    """Per-head causal logits max, computed the plain MHA way from explicit q and k (independent of MLA._max_logit)."""
    cfg_T = x.shape[1]
    from moonlet.model.rope import RotaryEmbedding
    from moonlet.model.attention import AttnContext

    rot = RotaryEmbedding(_CFG)
    pos = torch.arange(cfg_T)[None]
    cos, sin = rot(pos, x.dtype)
    ctx = AttnContext(cos, sin, pos)
    q_nope, q_pe = attn.query(x, ctx)
    k, _ = attn.expand_kv(attn.latent(x, ctx))
    q = torch.cat((q_nope, q_pe), -1)  # [1,T,H,dqk]
    s = torch.einsum("bthd,blhd->bhtl", q, k) * attn.scale
    mask = torch.ones(cfg_T, cfg_T, dtype=torch.bool).tril()
    return s.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))


_CFG = preset("tiny").replace(num_attention_heads=3)


@pytest.mark.parametrize("q_lora", [96, None])
def test_qk_clip_rescales_exactly_the_right_rows(q_lora):
    cfg = _CFG.replace(q_lora_rank=q_lora)
    torch.manual_seed(0)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        if hasattr(attn, name):
            getattr(attn, name).weight.data.fill_(1.0)
    H, dn, dr, dv = 3, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    wq = attn.q_b_proj.weight if q_lora else attn.q_proj.weight
    with torch.no_grad():  # make head 1 "hot": large q and k_nope rows -> logits far above tau
        wq.view(H, dn + dr, -1)[1] *= 40.0
        attn.kv_b_proj.weight.view(H, dn + dv, -1)[1, :dn] *= 40.0
    x = torch.randn(1, 24, cfg.hidden_size)
    before = _scaled_logits(attn, x)
    tau = 30.0
    assert before[1] > 2 * tau and before[0] < tau and before[2] < tau
    snap = {n: p.detach().clone() for n, p in attn.named_parameters()}

    gamma = qk_clip_(attn, before, tau)

    g = tau / float(before[1])
    assert torch.allclose(gamma, torch.tensor([1.0, g, 1.0]))
    q_old, q_new = snap["q_b_proj.weight" if q_lora else "q_proj.weight"].view(H, dn + dr, -1), wq.view(H, dn + dr, -1)
    assert torch.allclose(q_new[1, :dn], q_old[1, :dn] * math.sqrt(g), rtol=1e-6)  # q nope: sqrt(gamma)
    assert torch.allclose(q_new[1, dn:], q_old[1, dn:] * g, rtol=1e-6)  # q rope: gamma
    assert torch.equal(q_new[0], q_old[0]) and torch.equal(q_new[2], q_old[2])  # healthy heads untouched
    kv_old, kv_new = snap["kv_b_proj.weight"].view(H, dn + dv, -1), attn.kv_b_proj.weight.view(H, dn + dv, -1)
    assert torch.allclose(kv_new[1, :dn], kv_old[1, :dn] * math.sqrt(g), rtol=1e-6)  # k nope: sqrt(gamma)
    assert torch.equal(kv_new[1, dn:], kv_old[1, dn:])  # values untouched
    assert torch.equal(kv_new[0], kv_old[0]) and torch.equal(kv_new[2], kv_old[2])
    for name in snap:  # shared rope key (kv_a_proj_with_mqa), q_a_proj, norms, o_proj untouched
        if name not in ("q_b_proj.weight", "q_proj.weight", "kv_b_proj.weight"):
            assert torch.equal(snap[name], dict(attn.named_parameters())[name]), name
    after = _scaled_logits(attn, x)  # every logit of the hot head scaled by gamma: its max is now tau
    assert abs(float(after[1]) - tau) < 1e-3 * tau
    assert torch.allclose(after[[0, 2]], before[[0, 2]])


def test_model_reports_the_max_logit_qk_clip_uses():
    """ModelOutput.max_logits (measured in the forward) equals the explicit per-head max, and QKClip maps
    the list onto the layers (main, then MTP) in order."""
    cfg = _CFG.replace(num_hidden_layers=2)
    model = CausalLM(cfg).init_weights(seed=0, std=0.08).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    out = model(ids, ids, record_max_logit=True)
    assert len(out.max_logits) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    assert torch.allclose(out.max_logits[0], _scaled_logits(model.model.layers[0].self_attn, x), rtol=1e-4)
    clip = QKClip(model, tau=float(out.max_logits[0].min()) / 2)
    res = clip(out.max_logits)
    assert res["clipped_heads"] >= cfg.num_attention_heads and res["min_gamma"] < 1
    out2 = model(ids, ids, record_max_logit=True)
    assert torch.allclose(out2.max_logits[0], torch.full_like(out2.max_logits[0], clip.tau), rtol=1e-4)
