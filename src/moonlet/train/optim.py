"""Optimizers: AdamW with parameter groups, Muon (Moonlight variant) and MuonClip (Muon + QK-clip).

Which parameter goes where (`param_groups`):
- Muon: every matrix (ndim >= 2) except the token embedding and lm_head, as Moonlight/Kimi-K2 do:
  attention projections, dense and shared-expert SwiGLU, the MTP `eh_proj`, the router `gate.weight`
  [E, D], and the stacked routed experts [E, I, D] / [E, D, I], orthogonalised per expert (a batch of
  E matrices, each scaled by its own shape).
- AdamW, decayed: the embedding-free matrices Muon does not take (lm_head; and every matrix when the
  optimizer is plain AdamW).
- AdamW, no decay: embeddings, norms, biases (1-D).
- mHC (`moonlet.model.hyper.mhc_parameters`): always AdamW, never Muon -- the coefficient projection
  `fn` [n^2+2n, nC] is decayed, the static biases and gates (`base`, `scale`) are not. The mHC paper
  trains these in fp32 with AdamW: `fn` is a tiny read-out whose rows feed sigmoids and Sinkhorn, not a
  hidden-state transform whose update should be orthogonalised.
The router's `e_score_correction_bias` is a buffer moved by the balancing rule, not by an optimizer.

Muon step for W [A, B] (spec section 6.1): M <- mu M + G; G' = G + mu M (Nesterov); O = NS5(G') with
(a, b, c) = (3.4445, -4.7750, 2.0315) on G'/||G'||_F (transposed when A > B), in bfloat16 by
default; W <- W (1 - lr wd) - lr * 0.2 sqrt(max(A, B)) O. The 0.2 sqrt(max(A, B)) scale gives the
update an RMS of ~0.2, AdamW's typical update RMS, so one learning rate and weight decay serve
both kinds of parameter.

QK-clip (spec section 6.2), applied after the optimizer step with the per-head maximum scaled
attention logit S_h measured in that step's forward: gamma_h = min(1, tau / S_h); for heads with
S_h > tau, head h's q nope rows (q_b_proj, or q_proj) and k nope rows (kv_b_proj) are multiplied by
sqrt(gamma_h), its q rope rows by gamma_h; the shared rope key (kv_a_proj_with_mqa) and the value
rows are untouched. Every logit of head h is then scaled by exactly gamma_h.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..model.hyper import mhc_parameters

NS_COEFFS = (3.4445, -4.7750, 2.0315)
OPTIMIZERS = ("adamw", "muon", "muonclip")


# ---- Newton-Schulz ------------------------------------------------------------------------------------
def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                   dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """Approximate orthogonalisation U S' V^T of G [..., A, B] (each trailing matrix on its own).

    S' is not exactly 1: the quintic pushes every singular value into a band around 1 ([~0.7, ~1.2]
    for 5 steps), which is all Muon needs. Returns a tensor of G's shape in `dtype` (or G's dtype)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype) if dtype is not None else G
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def ns_dtype_for(ns_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """"auto": bfloat16 (Muon's reference setting) on GPUs and on CPUs with native bf16 dot products
    (avx512_bf16 or AMX), float32 on other CPUs. Measured (docs/LOG.md): on the AVX2-only VM a bf16
    Newton-Schulz over the tiny preset's matrices took 4.3 s vs 0.32 s in fp32; on the Zen 5 VM
    (avx512_bf16) a MuonClip step of the small preset takes 1.7 s with bf16 vs 6.2 s with fp32."""
    if ns_dtype == "auto":
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16_dot())
        return torch.bfloat16 if native_bf16 else torch.float32
    return ns_dtype


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    """torch.cpu's ISA probes (private; a torch without them counts as no), once per process: Muon
    asks for every parameter on every step."""
    cpu = torch.cpu
    probes = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(p is not None and p() for p in probes)


def muon_scale(shape: Sequence[int]) -> float:
    """0.2 * sqrt(max(A, B)) for a matrix (or a batch of matrices) of trailing shape [A, B]."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


# ---- Muon + AdamW in one optimizer -----------------------------------------------------------------------
class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW for the others (one optimizer, one state dict).

    Group keys: lr, weight_decay, use_muon; Muon groups: momentum, nesterov, ns_steps, ns_dtype;
    AdamW groups: betas, eps.

    `orthogonalize(update, fn)` applies the matrix function fn (Newton-Schulz) to an update; on one
    process that is fn(update). Sharded training replaces it (moonlet.dist.orthogonalize_sharded)
    so fn still sees whole matrices; everything else in the step is elementwise."""

    @staticmethod
    def orthogonalize(update: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(update)

    def __init__(self, param_groups: list[dict], lr: float = 2e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype | str | None = "auto", betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, betas=betas, eps=eps, use_muon=False)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            if g["use_muon"]:
                for p in g["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"Muon needs matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            g = g.add(buf, alpha=mu) if group["nesterov"] else buf
            update = self.orthogonalize(g, functools.partial(newton_schulz5, steps=group["ns_steps"],
                                                             dtype=ns_dtype_for(group["ns_dtype"], p.device)))
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * muon_scale(p.shape))

    def _adamw_group(self, group: dict) -> None:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


# ---- parameter groups ---------------------------------------------------------------------------------
def _embedding_like(model: nn.Module) -> set[int]:
    """ids of the token embedding(s) and the output head (excluded from Muon, kept out of decay)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        ids.add(id(head.weight))
    return ids


def classify(model: nn.Module, use_muon: bool) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"muon": [...], "decay": [...], "no_decay": [...]} of the trainable (requires_grad) parameters."""
    emb = _embedding_like(model)
    mhc = {id(p) for p in mhc_parameters(model)}
    head = getattr(model, "lm_head", None)
    head_id = id(head.weight) if head is not None else None
    out: dict[str, list] = {"muon": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if use_muon and p.ndim >= 2 and id(p) not in emb and id(p) not in mhc:
            out["muon"].append((name, p))
        elif p.ndim >= 2 and (id(p) not in emb or id(p) == head_id):
            out["decay"].append((name, p))
        else:
            out["no_decay"].append((name, p))
    return out


def build_optimizer(model: nn.Module, name: str = "muonclip", lr: float = 2e-3, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95,
                    ns_dtype: torch.dtype | str | None = "auto") -> torch.optim.Optimizer:
    """AdamW ("adamw") or Muon + AdamW ("muon", "muonclip": the clip itself is `QKClip`).

    Every group carries `base_lr` (= lr) for the schedule and `kind` (muon|decay|no_decay)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    use_muon = name != "adamw"
    parts = classify(model, use_muon)
    groups = []
    for kind, named in parts.items():
        if not named:
            continue
        groups.append({"params": [p for _, p in named], "names": [n for n, _ in named], "kind": kind,
                       "use_muon": kind == "muon", "weight_decay": 0.0 if kind == "no_decay" else weight_decay,
                       "lr": lr, "base_lr": lr})
    if not groups:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    if not use_muon:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8)
    return Muon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, ns_dtype=ns_dtype)


# ---- QK-clip --------------------------------------------------------------------------------------------
def scale_rows_plain(param: torch.Tensor, row_scale_R: torch.Tensor) -> None:
    """param[r, ...] *= row_scale_R[r] (QK-clip's per-head row scaling of a plain tensor)."""
    param.mul_(row_scale_R.to(param.dtype).view(-1, *([1] * (param.ndim - 1))))


@torch.no_grad()
def qk_clip_(attn: nn.Module, max_logit_H: torch.Tensor, tau: float,
             scale_rows_: Callable[[torch.Tensor, torch.Tensor], None] = scale_rows_plain) -> torch.Tensor:
    """Rescale one MLA layer's query/key weights so head h's logits shrink by gamma_h = min(1, tau/S_h).

    attn: a moonlet MLA (q_b_proj or q_proj rows per head [nope | rope], kv_b_proj rows per head
    [k_nope | v]). max_logit_H [H]: scaled max logit per head. Returns gamma [H] (1 = untouched).
    scale_rows_(param, row_scale): multiplies each (global) row of a weight in place; sharded
    training passes moonlet.dist.scale_rows_ (the rows of one head may live on another rank)."""
    H, dn, dr = attn.n_heads, attn.nope_dim, attn.rope_dim
    s = max_logit_H.detach().float().to(attn.kv_b_proj.weight.device)
    gamma = torch.ones_like(s)
    hot = torch.isfinite(s) & (s > tau)
    gamma[hot] = tau / s[hot]
    if not hot.any():
        return gamma
    wq = attn.q_b_proj.weight if getattr(attn, "q_lora_rank", None) is not None else attn.q_proj.weight
    root = gamma.sqrt()[:, None]
    q_rows = torch.cat([root.expand(H, dn), gamma[:, None].expand(H, dr)], dim=1).reshape(-1)
    scale_rows_(wq, q_rows)
    kv_rows = torch.cat([root.expand(H, dn), torch.ones(H, attn.v_dim, device=s.device)], dim=1).reshape(-1)
    scale_rows_(attn.kv_b_proj.weight, kv_rows)
    return gamma


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """MLA modules in the order the model reports `max_logits`: main layers, then MTP depths."""
    layers = list(model.model.layers) + list(getattr(model, "mtp", []))
    return [layer.self_attn for layer in layers]


class QKClip:
    """MuonClip's second half: after each optimizer step, clip the heads whose max logit exceeded tau."""

    def __init__(self, model: nn.Module, tau: float = 100.0,
                 scale_rows_: Callable[[torch.Tensor, torch.Tensor], None] = scale_rows_plain):
        if not tau > 0:
            raise ValueError(f"qk-clip tau must be positive, got {tau}")
        self.attn = attention_modules(model)
        self.tau = tau
        self.scale_rows_ = scale_rows_

    def __call__(self, max_logits: Iterable[torch.Tensor]) -> dict:
        """max_logits: per layer [H] (as ModelOutput.max_logits, maxed over micro-batches and ranks).
        Returns {"clipped_heads": n, "min_gamma": g}."""
        clipped, min_gamma = 0, 1.0
        for attn, s in zip(self.attn, max_logits):
            gamma = qk_clip_(attn, s, self.tau, self.scale_rows_)
            clipped += int((gamma < 1).sum())
            min_gamma = min(min_gamma, float(gamma.min()))
        return {"clipped_heads": clipped, "min_gamma": min_gamma}
