"""`parallelize`: turn a plain `CausalLM` into its FSDP2 (+ expert-parallel) form, in place.

Order (inside out, as FSDP2 requires): expert parallelism replaces each MoE's `experts`; optional
activation checkpointing wraps each block's forward; `fully_shard` then groups parameters into
units that are all-gathered just before use and freed after:
  * per MoE layer with ep > 1: the local expert block, over the dp_shard mesh (its gradients are
    summed over the EP ranks by the all-to-all backward, so the reduction divides by the world
    size, not by dp_shard);
  * with mixed precision: each router (`mlp.gate`) as its own unit kept in float32, as DeepSeek-V3
    keeps gating in full precision;
  * each decoder block and each MTP block, the embedding, (final norm + head), and the root.
Parameter names and global shapes are unchanged, so state dicts (and DCP checkpoints) are
layout-independent.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model import CausalLM
from ..model.moe import Experts, MoE
from ..train.runtime import checkpoint_blocks
from .expert_parallel import ExpertParallelExperts
from .mesh import ParallelMesh, ParallelismError, validate_parallelism


def parallelize(
    model: CausalLM,
    mesh: ParallelMesh,
    *,
    mixed_precision: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> CausalLM:
    """Shard `model` (same weights on every rank, float32, on this rank's device) over `mesh`.

    mixed_precision: compute dtype (e.g. torch.bfloat16) for all-gathered parameters and
      activations; sharded parameters, gradients after reduction and optimizer states stay float32.
    reduce_dtype: dtype of the gradient reduce-scatter.
    activation_checkpointing: recompute each block's activations in the backward pass.
    Returns the same module object, now with DTensor parameters.
    """
    cfg = model.config
    validate_parallelism(cfg, mesh.world_size, mesh.dp_shard_size, mesh.ep_size)
    blocks: list[nn.Module] = [*model.model.layers, *model.mtp]
    if mesh.ep_size > 1:
        for block in blocks:
            if isinstance(block.mlp, MoE):
                if not isinstance(block.mlp.experts, Experts):
                    raise ParallelismError("model is already parallelized")
                block.mlp.experts = ExpertParallelExperts(block.mlp.experts, mesh.ep)
    if activation_checkpointing:
        checkpoint_blocks(model, early_stop=False)  # EP ranks must replay the same collectives

    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=reduce_dtype if mixed_precision else None)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    shard = functools.partial(fully_shard, mesh=mesh.dp, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for block in blocks:
        if isinstance(block.mlp, MoE):
            if mesh.ep_size > 1:
                experts = fully_shard(block.mlp.experts, mesh=mesh.dp_shard, mp_policy=mp,
                                      reshard_after_forward=reshard_after_forward)
                experts.set_gradient_divide_factor(float(mesh.world_size))
                if mesh.device_type == "cpu" and mesh.dp_shard_size > 1:
                    # gloo has no PREMUL_SUM: plain SUM, then divide. (Not on a 1-rank mesh: torch
                    # 2.13's FSDP2 would divide twice there; its no-comm path divides once.)
                    experts.set_force_sum_reduction_for_comms(True)
            if mixed_precision is not None:
                fully_shard(block.mlp.gate, mesh=mesh.dp, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        shard(block)
    if not cfg.tie_word_embeddings:  # tied: embedding and head share one tensor, so one (root) unit
        shard(model.model.embed_tokens)
        shard([model.model.norm, model.lm_head], reshard_after_forward=False)  # used again right away in backward
    fully_shard(model, mesh=mesh.dp, mp_policy=mp, reshard_after_forward=False)
    return model

