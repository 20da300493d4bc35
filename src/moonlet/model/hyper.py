"""mHC: manifold-constrained hyper-connections (Xie et al., DeepSeek-AI, arXiv 2512.24880).

The residual stream becomes n parallel streams X [B, T, n, C] (n = `hc_mult`). Around each sublayer f
(attention, and the dense/MoE FFN) one `HyperConnection` computes, from the whole flattened stream:

    x' = RMSNorm(flatten(X))                      [B, T, nC]    (no weight: it folds into `fn`)
    z  = x' @ fn^T                                [B, T, n + n + n*n]  = (pre | post | res)
    H_pre  = sigmoid(a_pre  * z_pre  + b_pre)     [B, T, n]     reads the streams into f's input
    H_post = 2 sigmoid(a_post * z_post + b_post)  [B, T, n]     writes f's output into each stream
    H_res  = Sinkhorn(a_res * z_res + b_res)      [B, T, n, n]  doubly stochastic stream mixing
    X <- H_res X + H_post^T f(H_pre X)

(paper Eq. 7-9; `fn`, `base`, `scale` are the DeepSeek-V4 names of phi, b and the three alphas).
All coefficients are computed in float32 (the paper keeps them in fp32); the streams keep the model dtype.

Choices where the paper is silent (see docs/LOG.md, 2026-11-24):
- init "start near identity": fn ~ N(0, initializer_range), scale = hc_gate_init (0.01, the paper's
  alpha init), b_pre = logit(1/n) so H_pre averages the streams (n = 1: b_pre = 30, sigmoid = 1.0 in
  fp32), b_post = 0 so H_post = 1, b_res = 1 on the diagonal and 0 elsewhere (H_res = 0.475 on the
  diagonal, 0.175 off it at n = 4; lucidrains' choice). The streams start as copies of the embedding
  and any row-stochastic H_res maps identical streams to themselves, so the model starts as a plain
  pre-norm residual network plus a small input-dependent perturbation. A stronger diagonal (e.g. 4)
  slows Sinkhorn badly: 20 iterations then leave column sums off by ~2e-3 (docs/LOG.md).
- entry: the embedding is copied into every stream (HC); exit: the streams are averaged before the
  final norm (HC sums; with the final RMSNorm that differs only through eps; V4 learns a sigmoid
  collapse, we keep it parameter-free).
- Sinkhorn: exp(R - max R), then `hc_sinkhorn_iters` x (normalize columns, then rows), each divided
  by max(sum, hc_eps) (a floor, as F.normalize, so n = 1 gives exactly 1). Rows sum to 1 after the
  last step; columns approach 1 at a rate set by the logits' spread (see the test and docs/LOG.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

_SATURATED = 30.0  # sigmoid(30) == 1.0 in float32


def sinkhorn(logits_NN: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits onto (approximately) doubly stochastic matrices, in float32.

    M0 = exp(R - max R) (the shift cancels), then `iters` x (columns, then rows) L1-normalized,
    dividing by max(sum, eps)."""
    r = logits_NN.float()
    m = (r - r.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(eps)  # columns
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(eps)  # rows
    return m


class HyperConnection(nn.Module):
    """The mHC wrapper of one sublayer: `maps` gives (H_pre, H_post, H_res), `read`/`write` apply them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, C = cfg.hc_mult, cfg.hidden_size
        self.n = n
        self.iters, self.eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.gate_init, self.std = cfg.hc_gate_init, cfg.initializer_range
        self.fn = nn.Parameter(torch.empty(2 * n + n * n, n * C, dtype=torch.float32))  # phi^T
        self.base = nn.Parameter(torch.empty(2 * n + n * n, dtype=torch.float32))  # b_pre | b_post | b_res
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))  # alpha_pre, alpha_post, alpha_res
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start near identity (see the module docstring)."""
        n = self.n
        self.fn.copy_(torch.randn(self.fn.shape, generator=generator) * self.std)
        self.scale.fill_(self.gate_init)
        b_pre = _SATURATED if n == 1 else -math.log(n - 1)  # logit(1/n)
        b_res = torch.eye(n)
        self.base.copy_(torch.cat((torch.full((n,), b_pre), torch.zeros(n), b_res.flatten())))

    @torch.no_grad()
    def set_identity_(self) -> None:
        """H_pre = 1 (n = 1 only: one stream read whole), H_post = 1, H_res = I up to Sinkhorn: no dynamics."""
        n = self.n
        self.fn.zero_()
        self.scale.zero_()
        self.base.copy_(torch.cat((torch.full((n,), _SATURATED if n == 1 else -math.log(n - 1)),
                                   torch.zeros(n), (torch.eye(n) * 2 * _SATURATED).flatten())))

    def maps(self, X_BTnC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre [B,T,n], H_post [B,T,n], H_res [B,T,n,n]), float32."""
        B, T, n, C = X_BTnC.shape
        x = F.rms_norm(X_BTnC.reshape(B, T, n * C).float(), (n * C,), eps=self.norm_eps)
        z = F.linear(x, self.fn.float())  # [B,T,2n+n^2]
        a_pre, a_post, a_res = self.scale.float().unbind()
        b = self.base.float()
        h_pre = torch.sigmoid(a_pre * z[..., :n] + b[:n])
        h_post = 2 * torch.sigmoid(a_post * z[..., n:2 * n] + b[n:2 * n])
        h_res = sinkhorn((a_res * z[..., 2 * n:] + b[2 * n:]).view(B, T, n, n), self.iters, self.eps)
        return h_pre, h_post, h_res

    @staticmethod
    def read(X_BTnC: torch.Tensor, h_pre_BTn: torch.Tensor) -> torch.Tensor:
        """The sublayer's input sum_i H_pre_i X_i, [B, T, C] in X's dtype (accumulated in fp32)."""
        return torch.einsum("btn,btnc->btc", h_pre_BTn.float(), X_BTnC.float()).to(X_BTnC.dtype)

    @staticmethod
    def write(X_BTnC: torch.Tensor, y_BTC: torch.Tensor, h_post_BTn: torch.Tensor,
              h_res_BTnn: torch.Tensor) -> torch.Tensor:
        """H_res X + H_post^T y: the new streams [B, T, n, C] in X's dtype, computed in fp32 (bf16
        coefficients would break the row sums H_res relies on)."""
        mixed = torch.einsum("btij,btjc->btic", h_res_BTnn.float(), X_BTnC.float())
        return (mixed + h_post_BTn.float()[..., None] * y_BTC.float()[:, :, None, :]).to(X_BTnC.dtype)


def expand_streams(x_BTC: torch.Tensor, n: int) -> torch.Tensor:
    """Model entry: every stream starts as a copy of the embedding, [B, T, n, C]."""
    return x_BTC[:, :, None, :].expand(-1, -1, n, -1).contiguous()


def collapse_streams(X_BTnC: torch.Tensor) -> torch.Tensor:
    """Model exit: the mean of the streams, [B, T, C] (the final norm follows)."""
    return X_BTnC.mean(dim=2)


def amax_gain(h_res_BTnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's stability diagnostic for a (composite) mixing matrix: max absolute row sum
    (forward gain) and max absolute column sum (backward gain)."""
    a = h_res_BTnn.abs()
    return a.sum(-1).amax(), a.sum(-2).amax()


def mhc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All mHC parameters (fn, base, scale of every wrapper): an AdamW group, not Muon; the paper
    keeps them in fp32 and HC/V4 exclude the static biases and gates (base, scale) from weight decay."""
    return [p for m in model.modules() if isinstance(m, HyperConnection) for p in m.parameters()]


# ---- accounting hooks (pure functions of the config) -----------------------------------------------
def mhc_extra_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters mHC adds: per sublayer fn [n^2+2n, nC] + base [n^2+2n] + scale [3]; two sublayers per
    block. Keys: per_sublayer, main (the num_hidden_layers blocks), mtp (the MTP depths' blocks)."""
    if cfg.hc_mult is None:
        return {"per_sublayer": 0, "main": 0, "mtp": 0}
    n, C = cfg.hc_mult, cfg.hidden_size
    m = n * n + 2 * n
    per = m * n * C + m + 3
    return {"per_sublayer": per, "main": 2 * per * cfg.num_hidden_layers,
            "mtp": 2 * per * cfg.num_nextn_predict_layers}


def mhc_flops_per_token(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per token (2 per multiply-add) mHC adds to the main model: per sublayer the coefficient
    projection 2*nC*(n^2+2n), reading 2nC, mixing 2n^2C and writing 2nC (Sinkhorn and norms ignored).
    Keys: per_sublayer, main."""
    if cfg.hc_mult is None:
        return {"per_sublayer": 0, "main": 0}
    n, C = cfg.hc_mult, cfg.hidden_size
    per = 2 * n * C * (n * n + 2 * n) + 2 * n * C + 2 * n * n * C + 2 * n * C
    return {"per_sublayer": per, "main": 2 * per * cfg.num_hidden_layers}


def mhc_residual_bytes_per_token(cfg: ModelConfig, dtype_bytes: float = 2) -> int:
    """Activation bytes of the residual state per token per layer boundary: n*C elements (C without mHC)."""
    return int((cfg.hc_mult or 1) * cfg.hidden_size * dtype_bytes)
