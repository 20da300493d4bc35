"""Muon (and MuonClip) on sharded parameters.

Muon's update orthogonalizes each weight *matrix* (Newton-Schulz), so it needs whole matrices,
while FSDP gives each rank a block of rows. Strategy used here:
  * 2-D matrices (attention, dense MLP, shared experts, router): all-gather the update over the
    parameter's mesh, orthogonalize the full matrix on every rank, keep this rank's rows -- the
    "Distributed Muon" of Moonlight (Liu et al. 2025): exact, costs one all-gather of the update
    per matrix and redundant Newton-Schulz work on every rank.
  * stacked routed experts [E, I, D]: sharded only along the expert dim (EP blocks, FSDP Shard(0)),
    so every rank already holds whole expert matrices: orthogonalize per expert locally, no
    communication at all.
Everything elementwise (momentum, Nesterov, weight decay, the step) runs on the local shards.
An optimizer becomes shard-aware by routing its orthogonalization through `orthogonalize_sharded`.

QK-clip (MuonClip) needs the max attention logit over the *global* batch (`reduce.all_reduce_max`)
and per-head row scaling of sharded projections (`scale_rows_`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from ..train.optim import scale_rows_plain


def holds_whole_matrices(t: torch.Tensor) -> bool:
    """True when each rank's local block of `t` [..., A, B] is made of whole [A, B] matrices."""
    if not isinstance(t, DTensor):
        return True
    lead = t.ndim - 2
    for p in t.placements:
        if isinstance(p, Replicate):
            continue
        if isinstance(p, (Shard, _StridedShard)) and p.dim < lead:
            continue
        return False
    return True


def orthogonalize_sharded(update: torch.Tensor, orthogonalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a matrix function `orthogonalize` ([..., A, B] -> [..., A, B], batched over leading dims)
    to the global tensor `update` and return the result with `update`'s own sharding.

    Plain tensors: orthogonalize(update). DTensors holding whole matrices locally (stacked experts):
    applied to the local block. Otherwise: all-gather, apply, keep the local shard.
    """
    if not isinstance(update, DTensor):
        return orthogonalize(update)
    if holds_whole_matrices(update):
        out = orthogonalize(update.to_local())
        return DTensor.from_local(out, update.device_mesh, update.placements, shape=update.shape,
                                  stride=update.stride(), run_check=False)
    full = orthogonalize(update.full_tensor())
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


@torch.no_grad()
def scale_rows_(param: torch.Tensor, row_scale_R: torch.Tensor) -> None:
    """param[r, ...] *= row_scale_R[r] for the global rows of a (possibly row-sharded) parameter."""
    if not isinstance(param, DTensor):
        return scale_rows_plain(param, row_scale_R)
    local = param.to_local()
    if all(isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in param.placements):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        rows = row_scale_R[offset[0]:offset[0] + shape[0]]
        local.mul_(rows.to(local.device, local.dtype).view(-1, *([1] * (param.ndim - 1))))
        return
    full = row_scale_R.to(param.dtype).view(-1, *([1] * (param.ndim - 1))).expand(param.shape).contiguous()
    local.mul_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
