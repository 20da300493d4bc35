"""The parallelism planner: memory per rank, communication, time and cost of a training run.

Nothing is allocated; every figure is arithmetic on the config (FLOPs and parameter counts come from
`moonlet.accounting`, the one place for formulas). The layout matches moonlet's torch.distributed
training (issue 8): a DeviceMesh with a data-parallel *sharded* dimension (FSDP2, size `dp_shard`),
replicated `gpus / dp_shard` times (HSDP), and expert parallelism carved out of the sharded dimension
(as in torchtitan): routed experts are split over `ep` ranks, and each expert's weights are
FSDP-sharded over the remaining `dp_shard / ep` ranks, so every rank keeps 1/dp_shard of every tensor.
No tensor or pipeline parallelism is modelled.

Memory model per rank (mixed precision as FSDP2 runs it: fp32 sharded master weights, bf16 compute):
  weights      4 B x params / dp_shard                  (fp32 master shards)
  gradients    4 B x params / dp_shard                  (fp32, reduce-scattered)
  optimizer    AdamW: 8 B x params / dp_shard (m, v in fp32); Muon: 4 B (momentum) for hidden matrices,
               8 B for embedding, head, norms and router (which Muon leaves to AdamW)
  buffers      bf16 all-gathered weights of one block (two in flight: FSDP prefetches the next) +
               fp32 unsharded gradients of one block before the reduce-scatter
  activations  what a block saves for backward, in bf16 (`activation_elements_per_token_layer`), x layers
               x micro-batch tokens, plus the logits and the loss's fp32 log-softmax; with activation
               checkpointing only each block's input is kept, and one block's activations live again
               during its recomputation.
Not modelled: allocator fragmentation, NCCL workspaces, CUDA context (~1-3 GB in practice).

Time = tokens x training FLOPs/token / (gpus x peak x MFU); MFU is *model* FLOPs utilization against the
dense (no 2:4 sparsity) tensor peak of the chosen precision, so activation recomputation lowers the
achievable MFU rather than raising the FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import accounting as acc
from .config import ModelConfig


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core peak, TFLOP/s
    fp8_tflops: float  # dense
    memory_gb: float  # HBM capacity, GB (10^9 bytes)
    hbm_tbps: float  # HBM bandwidth, TB/s
    nvlink_gbps: float  # NVLink bandwidth per GPU as quoted (both directions together), GB/s
    scaleout_gbps: float  # network per GPU, one direction, GB/s (400 Gb/s InfiniBand NDR / ConnectX-7 = 50)
    source: str


# Public spec sheets; sparsity figures halved to dense. H800 is an H100 SXM with NVLink cut to 400 GB/s
# (same tensor cores). Sources: NVIDIA H100 datasheet (SXM: 1,979 TFLOPS BF16 / 3,958 FP8 with sparsity,
# 80 GB, 3.35 TB/s, NVLink 900 GB/s); NVIDIA H800 SXM5 product brief (NVLink 400 GB/s); NVIDIA H200 datasheet
# (same tensor peaks as H100 SXM, 141 GB, 4.8 TB/s); NVIDIA HGX B200 spec (per GPU 4.5 PFLOPS BF16 /
# 9 PFLOPS FP8 with sparsity, 180 GB, 7.7 TB/s, NVLink 1.8 TB/s). Scale-out: one 400 Gb/s NIC per GPU,
# as in DeepSeek-V3's H800 cluster (InfiniBand CX7).
GPUS: dict[str, GPU] = {
    "h800": GPU("H800 SXM", 989.4, 1978.9, 80, 3.35, 400, 50, "NVIDIA H100/H800 SXM datasheets"),
    "h100": GPU("H100 SXM", 989.4, 1978.9, 80, 3.35, 900, 50, "NVIDIA H100 datasheet"),
    "h200": GPU("H200 SXM", 989.4, 1978.9, 141, 4.8, 900, 50, "NVIDIA H200 datasheet"),
    "b200": GPU("B200 (HGX)", 2250.0, 4500.0, 180, 7.7, 1800, 50, "NVIDIA HGX B200 specifications"),
}


class PlanError(ValueError):
    """Flags that describe an impossible layout; the message names the flag."""


@dataclass
class PlanArgs:
    cfg: ModelConfig
    gpus: int
    gpu: str = "h800"
    dp_shard: int | None = None  # default: all gpus
    ep: int = 1
    seq: int = 4096
    global_batch: int = 1024  # sequences per optimizer step
    micro_batch: int = 1  # sequences per rank per forward/backward
    mfu: float = 0.4
    price: float = 2.0  # $ per GPU-hour
    tokens: float = 1e12
    activation_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | muon
    precision: str = "bf16"  # which dense peak MFU is measured against: bf16 | fp8
    dispatch_dtype: str = "bf16"  # all-to-all dispatch payload (DeepSeek-V3 dispatches in fp8)
    mtp: bool = False  # count the MTP depths (memory, FLOPs, all-to-all)
    gpus_per_node: int = 8


@dataclass
class Plan:
    args: PlanArgs
    gpu: GPU
    dp_replicate: int
    dp_shard: int
    grad_accum: int
    tokens_per_step: int
    memory: dict[str, float]  # bytes per rank
    fits: bool
    flops_per_token: float
    peak_flops: float  # per GPU, FLOP/s
    step_seconds: float
    gpu_hours_per_trillion: float
    cost_per_trillion: float
    gpu_hours: float
    cost: float
    days: float
    all_to_all_bytes_per_step: float  # per rank, sent
    all_to_all_seconds_per_step: float  # per rank if nothing overlapped
    fsdp_bytes_per_step: float  # per rank, sent (all-gather + reduce-scatter)
    fsdp_seconds_per_step: float  # per rank if nothing overlapped
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        a = self.args
        return {
            "gpus": a.gpus, "gpu": a.gpu, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "ep": a.ep,
            "seq": a.seq, "global_batch": a.global_batch, "micro_batch": a.micro_batch,
            "grad_accum": self.grad_accum, "tokens_per_step": self.tokens_per_step,
            "activation_checkpointing": a.activation_checkpointing, "optimizer": a.optimizer, "mtp": a.mtp,
            "memory_bytes_per_rank": self.memory, "fits": self.fits, "gpu_memory_bytes": self.gpu.memory_gb * 1e9,
            "training_flops_per_token": self.flops_per_token, "mfu": a.mfu, "precision": a.precision,
            "peak_flops_per_gpu": self.peak_flops, "step_seconds": self.step_seconds,
            "gpu_hours_per_trillion_tokens": self.gpu_hours_per_trillion,
            "cost_per_trillion_tokens": self.cost_per_trillion, "price_per_gpu_hour": a.price,
            "tokens": a.tokens, "gpu_hours": self.gpu_hours, "cost": self.cost, "days": self.days,
            "all_to_all_bytes_per_step_per_rank": self.all_to_all_bytes_per_step,
            "all_to_all_seconds_per_step": self.all_to_all_seconds_per_step,
            "fsdp_bytes_per_step_per_rank": self.fsdp_bytes_per_step,
            "fsdp_seconds_per_step": self.fsdp_seconds_per_step, "notes": self.notes,
        }


# ---- activations ---------------------------------------------------------------------------------
def activation_elements_per_token_layer(cfg: ModelConfig, moe: bool) -> dict[str, int]:
    """Elements one token's forward through one block keeps for backward (naive MLA, flash-style SDPA).

    attention: block input and its norm, q_a output and its norm, q [H, qk], kv_a output and the normed
    latent, K [H, qk] and V [H, dv] as SDPA saves them, the attention output [H, dv] (+ H log-sum-exps).
    FFN: its input and norm; SwiGLU saves gate, up, silu(gate) and their product per hidden unit; routed
    experts do that for each of the top-k copies plus the gathered inputs and outputs, and the router
    keeps its fp32 logits and scores (counted as 2 elements each).
    """
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, dv, C, R = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
    attn = 2 * D + q + H * qk + (C + R) + C + H * qk + H * dv + H * dv + 2 * H
    if moe:
        K, I, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
        Is = I * (cfg.n_shared_experts or 0)
        ffn = 2 * D + 2 * 2 * E + K * (2 * D + 4 * I) + 4 * Is
    else:
        ffn = 2 * D + 4 * cfg.intermediate_size
    return {"attention": attn, "ffn": ffn, "total": attn + ffn}


def activation_bytes(cfg: ModelConfig, tokens: int, checkpointing: bool, dtype_bytes: float = 2,
                     include_mtp: bool = False) -> dict[str, float]:
    """Activation memory of one micro-batch of `tokens` tokens (see the module docstring)."""
    layers = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    if include_mtp:
        layers += [cfg.is_moe] * cfg.num_nextn_predict_layers
    per_layer = [activation_elements_per_token_layer(cfg, m)["total"] for m in layers]
    V, D = cfg.vocab_size, cfg.hidden_size
    heads = 1 + (cfg.num_nextn_predict_layers if include_mtp else 0)
    logits = tokens * V * (dtype_bytes + 4) * heads  # bf16 logits + fp32 log-softmax per head
    if checkpointing:
        blocks = tokens * D * dtype_bytes * len(layers) + tokens * max(per_layer) * dtype_bytes
    else:
        blocks = tokens * sum(per_layer) * dtype_bytes
    return {"blocks": blocks, "logits": logits, "total": blocks + logits}


# ---- the plan ------------------------------------------------------------------------------------
def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise PlanError(f"{name} must be an integer >= {minimum}, got {v!r}")


def validate(a: PlanArgs) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, grad_accum) or PlanError naming the flag that does not fit."""
    cfg = a.cfg
    _check_int("--gpus", a.gpus)
    dp_shard = a.gpus if a.dp_shard is None else a.dp_shard
    for name, v in (("--dp-shard", dp_shard), ("--ep", a.ep), ("--seq", a.seq), ("--global-batch", a.global_batch),
                    ("--micro-batch", a.micro_batch), ("--gpus-per-node", a.gpus_per_node)):
        _check_int(name, v)
    if a.gpu not in GPUS:
        raise PlanError(f"--gpu {a.gpu!r} is not one of {', '.join(GPUS)}")
    if a.gpus % dp_shard:
        raise PlanError(f"--gpus ({a.gpus}) must be divisible by --dp-shard ({dp_shard})")
    if a.ep > 1 and not cfg.is_moe:
        raise PlanError(f"--ep {a.ep} needs a MoE config (this one has no routed experts)")
    if cfg.is_moe and cfg.n_routed_experts % a.ep:
        raise PlanError(f"n_routed_experts ({cfg.n_routed_experts}) must be divisible by --ep ({a.ep})")
    if dp_shard % a.ep:
        raise PlanError(f"--dp-shard ({dp_shard}) must be divisible by --ep ({a.ep}): expert parallelism is "
                        f"carved out of the sharded data-parallel ranks")
    dp = a.gpus  # every rank is a data-parallel rank (EP ranks see different tokens too)
    if a.global_batch % (dp * a.micro_batch):
        raise PlanError(f"--global-batch ({a.global_batch}) must be divisible by data-parallel ranks x "
                        f"--micro-batch ({dp} x {a.micro_batch})")
    if a.seq > cfg.max_position_embeddings:
        raise PlanError(f"--seq ({a.seq}) exceeds max_position_embeddings ({cfg.max_position_embeddings})")
    if not (0 < a.mfu <= 1):
        raise PlanError(f"--mfu must be in (0, 1], got {a.mfu}")
    if a.price < 0:
        raise PlanError(f"--price must be >= 0, got {a.price}")
    if not a.tokens > 0:
        raise PlanError(f"--tokens must be positive, got {a.tokens}")
    if a.optimizer not in ("adamw", "muon"):
        raise PlanError(f"--optimizer must be adamw or muon, got {a.optimizer!r}")
    if a.precision not in ("bf16", "fp8"):
        raise PlanError(f"--precision must be bf16 or fp8, got {a.precision!r}")
    if a.dispatch_dtype not in ("bf16", "fp8"):
        raise PlanError(f"--dispatch-dtype must be bf16 or fp8, got {a.dispatch_dtype!r}")
    return a.gpus // dp_shard, dp_shard, a.global_batch // (dp * a.micro_batch)


def plan(a: PlanArgs) -> Plan:
    cfg = a.cfg
    dp_replicate, dp_shard, grad_accum = validate(a)
    gpu = GPUS[a.gpu]
    pc = acc.param_counts(cfg)
    P = pc["total_with_mtp"] if a.mtp else pc["total"]
    P_exp = acc.expert_param_count(cfg, include_mtp=a.mtp)
    P_ne = P - P_exp

    # ---- memory per rank
    shard = P / dp_shard
    if a.optimizer == "adamw":
        opt = 8 * shard
    else:  # Muon on hidden matrices, AdamW on embedding, head, norms and router
        D, L = cfg.hidden_size, cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if a.mtp else 0)
        adam_part = pc["embedding"] + (0 if cfg.tie_word_embeddings else pc["lm_head"]) + (2 * L + 1) * D
        adam_part += acc.layer_params(cfg).router * acc.n_moe_layers(cfg)
        opt = (4 * (P - adam_part) + 8 * adam_part) / dp_shard
    # one block unsharded: non-expert part of the biggest block + its local experts
    lp = acc.layer_params(cfg)
    block_ne = lp.attention + lp.norms + max(lp.dense_mlp, lp.router + lp.router_bias + lp.shared if cfg.is_moe else 0)
    block_exp = (cfg.n_routed_experts // a.ep) * lp.expert if cfg.is_moe else 0
    block = block_ne + block_exp
    buffers = 2 * 2 * block + 4 * block  # two bf16 blocks gathered (prefetch) + fp32 grads before reduce-scatter
    micro_tokens = a.micro_batch * a.seq
    act = activation_bytes(cfg, micro_tokens, a.activation_checkpointing, 2, a.mtp)
    memory = {"weights": 4 * shard, "gradients": 4 * shard, "optimizer": opt, "buffers": buffers,
              "activations": act["blocks"], "logits": act["logits"]}
    memory["total"] = sum(memory.values())
    fits = memory["total"] <= gpu.memory_gb * 1e9

    # ---- compute
    fpt = acc.flops_per_token(cfg, a.seq, training=True, include_mtp=a.mtp)
    peak = (gpu.bf16_tflops if a.precision == "bf16" else gpu.fp8_tflops) * 1e12
    tokens_per_step = a.global_batch * a.seq
    step_seconds = tokens_per_step * fpt / (a.gpus * peak * a.mfu)
    gpu_seconds_per_token = fpt / (peak * a.mfu)
    gpu_hours_per_trillion = gpu_seconds_per_token * 1e12 / 3600
    gpu_hours = gpu_seconds_per_token * a.tokens / 3600

    # ---- expert-parallel all-to-all (per rank, per optimizer step)
    moe_layers = acc.n_moe_layers(cfg) + (cfg.num_nextn_predict_layers if (a.mtp and cfg.is_moe) else 0)
    rank_tokens = tokens_per_step / a.gpus
    a2a = 0.0
    a2a_seconds = 0.0
    if cfg.is_moe and a.ep > 1:
        off_rank = (a.ep - 1) / a.ep  # uniform routing: this share of each token's K copies leaves the rank
        per_layer_pass = rank_tokens * cfg.num_experts_per_tok * cfg.hidden_size * off_rank * (
            acc.dtype_bytes(a.dispatch_dtype) + 2)  # dispatch + bf16 combine
        passes = 3 if a.activation_checkpointing else 2  # forward, backward (+ the recomputed forward)
        a2a = moe_layers * per_layer_pass * passes
        # peers inside the node go over NVLink, the rest over the network; the slower side sets the time
        in_node = min(a.ep, a.gpus_per_node) - 1
        cross = a.ep - 1 - in_node
        nvlink = gpu.nvlink_gbps / 2 * 1e9
        t_in = a2a * in_node / (a.ep - 1) / nvlink
        t_out = a2a * cross / (a.ep - 1) / (gpu.scaleout_gbps * 1e9)
        a2a_seconds = max(t_in, t_out)

    # ---- FSDP traffic per rank per step: all-gather bf16 params for forward and backward (again for the
    # recompute with checkpointing), reduce-scatter fp32 grads, per micro-batch step
    fsdp = 0.0
    if dp_shard > 1:
        gathers = 3 if a.activation_checkpointing else 2
        ne_frac = (dp_shard - 1) / dp_shard
        e_group = dp_shard // a.ep
        e_frac = (e_group - 1) / e_group if e_group > 1 else 0.0
        local_unsharded = P_ne * ne_frac + (P_exp / a.ep) * e_frac
        fsdp = grad_accum * local_unsharded * (2 * gathers + 4)
    # a ring collective over a group that spans nodes runs at the network's speed
    link = gpu.scaleout_gbps * 1e9 if dp_shard > a.gpus_per_node else gpu.nvlink_gbps / 2 * 1e9
    fsdp_seconds = fsdp / link

    notes = []
    if not fits:
        tips = (["--activation-checkpointing"] if not a.activation_checkpointing else []) + \
            (["a larger --dp-shard"] if dp_shard < a.gpus else []) + (["a smaller --micro-batch"] if a.micro_batch > 1 else [])
        notes.append(f"does not fit: {memory['total'] / 1e9:.1f} GB per rank > {gpu.memory_gb:.0f} GB"
                     + (f"; try {' or '.join(tips)}" if tips else ""))
    if fsdp_seconds > step_seconds:
        notes.append(f"FSDP traffic ({fsdp_seconds:.1f} s/step unoverlapped) exceeds the compute time "
                     f"({step_seconds:.1f} s): it scales with grad accumulation ({grad_accum}); a larger "
                     f"--micro-batch or a smaller --dp-shard (HSDP) cuts it")
    if cfg.is_moe and a.ep > 1 and cfg.n_group and cfg.n_group > 1 and a.ep > a.gpus_per_node:
        nodes = a.ep // a.gpus_per_node
        if nodes == cfg.n_group:
            notes.append(f"node-limited routing: the {cfg.n_group} expert groups map to the {nodes} nodes of an EP "
                         f"group, so each token reaches at most topk_group={cfg.topk_group} nodes (not modelled: "
                         f"the all-to-all bytes above assume uniform routing over all EP ranks)")
    return Plan(a, gpu, dp_replicate, dp_shard, grad_accum, tokens_per_step, memory, fits, fpt, peak,
                step_seconds, gpu_hours_per_trillion, gpu_hours_per_trillion * a.price, gpu_hours,
                gpu_hours * a.price, gpu_hours / a.gpus / 24, a2a, a2a_seconds, fsdp, fsdp_seconds, notes)


def implied_mfu(cfg: ModelConfig, gpu_hours_per_trillion: float, gpu: str = "h800", seq: int = 4096,
                precision: str = "bf16", include_mtp: bool = False) -> float:
    """The MFU at which a published GPU-hours-per-trillion-tokens figure is met."""
    g = GPUS[gpu]
    peak = (g.bf16_tflops if precision == "bf16" else g.fp8_tflops) * 1e12
    fpt = acc.flops_per_token(cfg, seq, training=True, include_mtp=include_mtp)
    return fpt * 1e12 / (gpu_hours_per_trillion * 3600 * peak)


def format_plan(p: Plan, name: str) -> str:
    a, m = p.args, p.memory
    gb = lambda x: f"{x / 1e9:,.2f} GB"  # noqa: E731
    lines = [
        f"moonlet plan: {name} on {a.gpus} x {p.gpu.name} ({p.gpu.source})",
        f"  mesh: dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard}; ep {a.ep} (experts: "
        + (f"{a.cfg.n_routed_experts // a.ep} per EP rank, sharded over {p.dp_shard // a.ep})" if a.cfg.is_moe else "none)"),
        f"  batch: {a.global_batch} seqs x {a.seq} = {p.tokens_per_step:,} tokens/step; micro-batch {a.micro_batch}, "
        f"grad accumulation {p.grad_accum}",
        f"  optimizer {a.optimizer}, activation checkpointing {'on' if a.activation_checkpointing else 'off'}, "
        f"MTP {'counted' if a.mtp else 'not counted'}",
        "",
        "memory per rank",
        f"  weights (fp32 shards)      {gb(m['weights'])}",
        f"  gradients (fp32 shards)    {gb(m['gradients'])}",
        f"  optimizer states           {gb(m['optimizer'])}",
        f"  gather/reduce buffers      {gb(m['buffers'])}",
        f"  activations (bf16)         {gb(m['activations'])}",
        f"  logits + loss              {gb(m['logits'])}",
        f"  total                      {gb(m['total'])} of {p.gpu.memory_gb:.0f} GB -> "
        + ("fits" if p.fits else "DOES NOT FIT"),
        "",
        "communication per rank per step",
        f"  expert all-to-all          {gb(p.all_to_all_bytes_per_step)} ({a.dispatch_dtype} dispatch, bf16 combine; "
        f"{p.all_to_all_seconds_per_step:.2f} s if not overlapped)",
        f"  FSDP gather + reduce       {gb(p.fsdp_bytes_per_step)} ({p.fsdp_seconds_per_step:.2f} s if not overlapped)",
        "",
        "compute",
        f"  training FLOPs/token       {p.flops_per_token / 1e9:.1f} GFLOP (6N + causal attention, seq {a.seq})",
        f"  at MFU {a.mfu:.1%} of {p.peak_flops / 1e12:,.1f} TFLOP/s ({a.precision} dense peak)",
        f"  step time                  {p.step_seconds:.2f} s",
        f"  per trillion tokens        {p.gpu_hours_per_trillion / 1e3:,.1f}K GPU-hours, "
        f"${p.cost_per_trillion / 1e6:,.3f}M at ${a.price:g}/GPU-hour, "
        f"{p.gpu_hours_per_trillion / a.gpus / 24:.2f} days on {a.gpus} GPUs",
        f"  {'for %gT tokens' % (a.tokens / 1e12):<27}{p.gpu_hours / 1e6:,.3f}M GPU-hours, ${p.cost / 1e6:,.3f}M, "
        f"{p.days:.1f} days",
    ]
    for n in p.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def parse_count(s: str) -> float:
    """'15.5T', '1e12', '500B' -> a number of tokens."""
    t = s.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise PlanError(f"--tokens {s!r} is not a number (e.g. 14.8T, 500B, 1e12)") from None
    if not math.isfinite(v):
        raise PlanError(f"--tokens must be finite, got {s!r}")
    return v
