"""Shared by tests/test_dist.py (one-process references) and tests/_dist_worker.py (the ranks).

The training step here is the same function for the reference and the distributed run; only the
injected reductions differ (identity on one process, moonlet.dist collectives on many).

`RefMuon` is a small local reference Muon (NS5 coefficients (3.4445, -4.7750, 2.0315), Nesterov
momentum, update scale 0.2 * sqrt(max(A, B)), decoupled weight decay); its `orthogonalize` hook is
where moonlet.dist.orthogonalize_sharded plugs in. moonlet.train.optim.Muon replaces it later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moonlet.config import ModelConfig
from moonlet.model import CausalLM
from moonlet.model.moe import MoE

B_GLOBAL, T, STEPS, MAX_NORM, GAMMA = 4, 16, 3, 0.5, 1e-3
TAU = 0.045  # QK-clip threshold: between the per-head max logits of this model (0.035..0.065), so some heads clip


def tiny_cfg() -> ModelConfig:
    # 1 dense + 1 MoE layer + 1 MTP depth (MoE too); 8 experts in 4 groups (node-limited routing)
    return ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ).validate()


def make_model(cfg: ModelConfig, skew: bool = False) -> CausalLM:
    model = CausalLM(cfg).init_weights(seed=1234).train()
    model.set_balance_alpha(0.01)
    if skew:  # experts 6, 7 never chosen (with ep=4 the last rank gets no tokens), experts 0, 1 favoured
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.gate.e_score_correction_bias[6:] = -1e3
                moe.gate.e_score_correction_bias[:2] = 0.5
    return model


def make_batches(cfg: ModelConfig, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    out = []
    for _ in range(steps):
        seq = torch.randint(3, cfg.vocab_size, (B_GLOBAL, T + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


# ---- reference Muon --------------------------------------------------------------------------------
def zeropower_ns5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz quintic orthogonalization of [..., A, B] (batched over leading dims), fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def _plain(update, fn):
    return fn(update)


class RefMuon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, orthogonalize=_plain):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        self.orthogonalize = orthogonalize  # (update, fn) -> fn applied to the (global) update

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                u = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                O = self.orthogonalize(u, zeropower_ns5)
                A, B = p.shape[-2:]
                p.mul_(1 - lr * wd)
                p.add_(O, alpha=-lr * 0.2 * math.sqrt(max(A, B)))


def make_optimizers(model: CausalLM, kind: str, orthogonalize=_plain, foreach: bool | None = None):
    if kind == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=foreach)]
    assert kind == "muon"
    matrices, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight"))
        (matrices if is_matrix else rest).append(p)
    return [RefMuon(matrices, orthogonalize=orthogonalize),
            torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=foreach)]


# ---- one training step ---------------------------------------------------------------------------
def _scale_rows_plain(param, scale_R):
    param.mul_(scale_R.to(param.dtype).view(-1, *([1] * (param.ndim - 1))))


@torch.no_grad()
def qk_clip_(model: CausalLM, max_logits: list[torch.Tensor], tau: float, scale_rows=_scale_rows_plain) -> None:
    """MuonClip's QK-clip for MLA (Kimi K2): per head h with max logit > tau, gamma = tau / max;
    q_nope and k_nope rows scaled by sqrt(gamma), q_rope rows by gamma (shared k_rope untouched)."""
    blocks = [*model.model.layers, *model.mtp]
    for block, ml in zip(blocks, max_logits):
        attn = block.self_attn
        gamma = (tau / ml.float()).clamp(max=1.0)
        s = gamma.sqrt()
        q = torch.cat([s[:, None].expand(-1, attn.nope_dim), gamma[:, None].expand(-1, attn.rope_dim)], 1)
        kv = torch.cat([s[:, None].expand(-1, attn.nope_dim), torch.ones_like(s)[:, None].expand(-1, attn.v_dim)], 1)
        scale_rows(attn.q_b_proj.weight, q.reshape(-1))
        scale_rows(attn.kv_b_proj.weight, kv.reshape(-1))


@dataclass
class Reductions:
    """Identity on one process; moonlet.dist collectives under torch.distributed."""

    clip: object = torch.nn.utils.clip_grad_norm_
    loads: object = lambda loads: loads  # noqa: E731
    max: object = lambda xs: xs  # noqa: E731
    loss: object = lambda x: x.detach()  # noqa: E731
    scale_rows: object = _scale_rows_plain


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    global_load: list[list[int]] = field(default_factory=list)


def train_steps(model: CausalLM, batches, opts, steps: range, red: Reductions, muonclip: bool = False) -> History:
    h = History()
    main_moes = [b.mlp for b in model.model.layers if isinstance(b.mlp, MoE)]
    for step in steps:
        ids, labels = batches[step]
        out = model(ids, labels, record_max_logit=muonclip)
        out.loss.backward()
        h.norms.append(float(red.clip(model.parameters(), MAX_NORM)))
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        if muonclip:
            qk_clip_(model, red.max(out.max_logits), TAU, red.scale_rows)
        loads = red.loads(out.expert_load)  # DeepSeek-V3 aux-loss-free balancing on the global load
        with torch.no_grad():
            for moe, load in zip(main_moes, loads):
                load = load.float()
                moe.gate.e_score_correction_bias.add_(GAMMA * torch.sign(load.mean() - load))
        h.losses.append(float(red.loss(out.loss)))
        h.global_load.append([int(v) for v in loads[0]])
    return h


# ---- scenarios: (ranks, dp_shard, ep, optimizer, ...) ------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    ranks: int
    dp_shard: int
    ep: int
    optim: str
    skew: bool = False
    ac: bool = False
    steps: int = STEPS
    start: int = 0
    save: str | None = None  # save a DCP checkpoint after the steps under OUT/save
    resume: str | None = None  # load OUT/resume before the steps
    export: bool = False  # write a consolidated HF checkpoint to OUT/<name>_hf
    mixed: bool = False  # bf16 compute (FSDP MixedPrecisionPolicy)
    foreach: bool | None = None  # AdamW's multi-tensor path (the GPU default) over DTensors of two meshes


SCENARIOS = [
    # 4 ranks
    Scenario("fsdp4_adamw", 4, 4, 1, "adamw"),
    Scenario("fsdp4_muon", 4, 4, 1, "muon", ac=True),
    Scenario("ep2x2_muon", 4, 2, 2, "muon", save="ckpt_ep2x2", export=True),
    Scenario("ep4_adamw_skew", 4, 1, 4, "adamw", skew=True, ac=True, foreach=True),
    # 2 ranks
    Scenario("fsdp2_muon", 2, 2, 1, "muon"),
    Scenario("ep2_adamw", 2, 1, 2, "adamw"),
    Scenario("resume2_from_ep2x2", 2, 2, 1, "muon", steps=2, start=STEPS, resume="ckpt_ep2x2"),
    Scenario("ep2_bf16", 2, 1, 2, "adamw", mixed=True),
]
