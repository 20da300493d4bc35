"""The training fast paths equal the plain ones: blocked causal attention vs SDPA (MHA and the shared
latent "head" of the absorbed form), grouped-GEMM experts vs the per-expert loop, and the absorbed
form chosen by default vs the naive one (values and gradients, float64 where it matters)."""

import pytest
import torch
import torch.nn.functional as F

import moonlet.model.moe as moe
from moonlet.config import preset
from moonlet.model import CausalLM
from moonlet.model.attention import causal_attention_blocked


@pytest.mark.parametrize("T", [1, 5, 128, 129, 300])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_blocked_attention_equals_sdpa(T, shared_kv):
    B, H, d, e = 2, 3, 24, 16
    G = 1 if shared_kv else H
    q = torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, G, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, G, e, dtype=torch.float64, requires_grad=True)
    go = torch.randn(B, T, H, e, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.expand(B, T, H, d).transpose(1, 2),
                                         v.expand(B, T, H, e).transpose(1, 2), is_causal=True, scale=0.3)
    ref = ref.transpose(1, 2)
    g_ref = torch.autograd.grad(ref, (q, k, v), go)
    for block in (7, 128):
        out = causal_attention_blocked(q, k, v, 0.3, block=block)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), go), g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grouped_experts_equal_loop(monkeypatch):
    torch.manual_seed(0)
    E, D, I, N, K = 6, 16, 8, 20, 2
    ex = moe.Experts(E, D, I)  # float32: grouped_mm has no float64 kernel
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.randint(0, 3, (N, K))  # experts 3..5 receive no tokens
    idx[:, 1] = (idx[:, 0] + 1) % 3
    w = torch.rand(N, K)

    def run():
        y = ex(x, idx, w)
        grads = torch.autograd.grad(y.square().sum(), (x, *ex.parameters()))
        return y, grads

    assert moe._grouped_mm_ok(x.device, x.dtype)
    y_g, g_g = run()
    monkeypatch.setattr(moe, "_grouped_mm_ok", lambda *a: False)
    y_l, g_l = run()
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_g, g_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_g[1][3:].abs().max() == 0  # unused experts get exactly zero gradient


def test_default_form_absorbed_when_not_costlier():
    # small-like shapes: 2 * kv_lora_rank == nope + v, so training defaults to the absorbed form
    cfg = preset("tiny").replace(kv_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=0)
    model = CausalLM(cfg).init_weights(seed=0).double()
    # a fixed batch: with unseeded ids (whatever RNG state earlier tests left) a router near-tie
    # occasionally flipped one token's expert between the two forms (1.4e-6 logit differences)
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    out_default = model(ids, labels=ids)
    g_default = torch.autograd.grad(out_default.loss, list(model.parameters()), allow_unused=True)
    out_naive = model(ids, labels=ids, absorbed=False)
    g_naive = torch.autograd.grad(out_naive.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out_default.logits, out_naive.logits, rtol=0, atol=1e-10)
    for a, b in zip(g_default, g_naive):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_cross_entropy_equals_torch(dtype):
    from moonlet.model.loss import cross_entropy

    logits = (torch.randn(300, 1000, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 1000, (300,))
    target[::7] = -100  # ignored rows: no loss, zero gradient
    ref = F.cross_entropy(logits.to(torch.promote_types(dtype, torch.float32)), target, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref, logits)
    before = logits.detach().clone()
    out = cross_entropy(logits, target, -100)
    (g,) = torch.autograd.grad(out, logits)
    assert torch.equal(logits.detach(), before)  # backward must not touch the logits it saved
    assert out.dtype == ref.dtype and g.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=0, atol=tol if dtype != torch.bfloat16 else 1e-7)
    assert g[::7].abs().max() == 0


def test_padded_group_rows_by_hand():
    # groups of 3, 0 and 5 rows padded to multiples of 4: rows 0-2 stay, group 2 starts at row 4
    rows, total, padded = moe._padded_rows(torch.tensor([3, 0, 5]), 8, 4)
    assert rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert total == 12 and padded.tolist() == [4, 0, 8]


def test_padded_grouped_experts_equal_unpadded(monkeypatch):
    """The zero rows padding each expert group (bf16/fp16 on CPU) change neither outputs nor gradients."""
    torch.manual_seed(0)
    E, D, I, N, K = 6, 16, 8, 37, 2
    ex = moe.Experts(E, D, I)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:K] for _ in range(N)])  # experts 4, 5 unused
    w = torch.rand(N, K)

    def run(pad: bool):
        monkeypatch.setattr(moe, "jit_per_shape", lambda *a: pad)
        y = ex(x, idx, w)
        return y, torch.autograd.grad(y.square().sum(), (x, *ex.parameters()))

    y_p, g_p = run(True)
    y_u, g_u = run(False)
    torch.testing.assert_close(y_p, y_u, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_p, g_u):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"rope_interleave": False}])
def test_folded_absorbed_attention_equals_per_head_form(changes):
    """Training's cache-free absorbed attention (W_UK, W_UV and the softmax scale folded into the
    projections around it) equals the per-head absorbed form: output, max logits, gradients (float64)."""
    from moonlet.model.attention import AttnContext

    cfg = preset("tiny").replace(**changes)
    attn = CausalLM(cfg).init_weights(seed=0, std=0.05).double().model.layers[0].self_attn
    B, T = 2, 37
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    from moonlet.model.rope import RotaryEmbedding

    cos, sin = RotaryEmbedding(cfg).double()(pos, torch.float64)
    ctx = AttnContext(cos, sin, pos, absorbed=True, record_max_logit=True)
    params = [x, *attn.parameters()]

    out, max_logit = attn(x, ctx)  # the folded path
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, params, go)
    q_nope, q_pe = attn.query(x, ctx)
    latent = attn.latent(x, ctx)
    ref = attn.o_proj(attn._absorbed(q_nope, q_pe, latent, None).reshape(B, T, -1))
    g_ref = torch.autograd.grad(ref, params, go)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(max_logit, attn._max_logit(q_nope, q_pe, latent, None), rtol=0, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fused_cross_entropy_scaled_and_single_backward():
    """The gradient made in forward is scaled by the incoming one (loss weights, e.g. MTP's lambda);
    a second backward through the same loss is refused rather than silently wrong."""
    from moonlet.model.loss import cross_entropy

    logits = torch.randn(40, 50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (40,))
    (g_ref,) = torch.autograd.grad(0.3 * F.cross_entropy(logits, target), logits)
    (g,) = torch.autograd.grad(0.3 * cross_entropy(logits, target), logits)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-14)
    loss = cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_rmsnorm_fused_backward_equals_composite():
    """RMSNorm's hand-written autograd node (fp32/fp64 input) equals F.rms_norm's composite, and
    passes gradcheck (float64)."""
    from moonlet.model.norm import RMSNorm

    norm = RMSNorm(24, eps=1e-6).double()
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 5, 24, dtype=torch.float64)
    out = norm(x)
    ref = norm.weight * F.rms_norm(x, (24,), eps=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    for a, b in zip(torch.autograd.grad(out, (x, norm.weight), go), torch.autograd.grad(ref, (x, norm.weight), go)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    from moonlet.model.norm import _RMSNormScale

    w = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, v: _RMSNormScale.apply(t, v, 1e-6), (x[:1, :2], w))
