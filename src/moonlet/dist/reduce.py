"""Cross-rank reductions a sharded training step needs: gradient norm and clipping, expert loads,
max attention logits (MuonClip), scalar averages for logging."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from .mesh import ParallelMesh


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The gradient norm of the unsharded model, identical on every rank (float32 result).

    Parameters may be DTensors on different meshes (FSDP over all ranks, experts over
    [dp_shard, ep]) and/or plain (replicated) tensors. Each rank accumulates |g|^p of its local
    shards in float64 (a float32 sum over millions of entries drifts by ~1e-5), then one all-reduce
    per (mesh, sharded mesh dim) adds the shards; replicated dims are not reduced, so nothing is
    counted twice.
    """
    norm_type = float(norm_type)
    inf = norm_type == float("inf")
    partial: dict[tuple, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if isinstance(g, DTensor) else g
        v = (local.detach().abs().amax().double() if local.numel() else local.new_zeros((), dtype=torch.float64)) if inf \
            else torch.linalg.vector_norm(local.detach(), norm_type, dtype=torch.float64) ** norm_type
        if isinstance(g, DTensor):
            shard_dims = tuple(i for i, pl in enumerate(g.placements) if not isinstance(pl, Replicate))
            key = (g.device_mesh, shard_dims)
            partial[key] = v if key not in partial else (torch.maximum(partial[key], v) if inf else partial[key] + v)
        else:
            total = v if total is None else (torch.maximum(total, v) if inf else total + v)
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    for (mesh, shard_dims), v in partial.items():
        for d in shard_dims:
            dist.all_reduce(v, op=op, group=mesh.get_group(d))
        total = v if total is None else (torch.maximum(total, v) if inf else total + v)
    if total is None:
        return torch.tensor(0.0)
    return (total if inf else total ** (1.0 / norm_type)).float()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for sharded models: scales every gradient by
    min(1, max_norm / (total_norm + 1e-6)) with the norm of `grad_norm`; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        local.mul_(coef.to(local.device, local.dtype))
    return total


def all_reduce_expert_load(loads_E: list[torch.Tensor], mesh: ParallelMesh | None) -> list[torch.Tensor]:
    """Per-layer expert loads [E] (tokens routed to each expert on this rank) -> global loads, summed
    over all data-parallel ranks in one collective, so the balancing-bias update is identical on
    every rank and equal to the one-process update on the global batch."""
    if mesh is None or mesh.world_size == 1 or not loads_E:
        return loads_E
    stacked = torch.stack([l.to(torch.int64) for l in loads_E])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=mesh.dp.get_group())
    return list(stacked.unbind(0))


def all_reduce_max(values: list[torch.Tensor], mesh: ParallelMesh | None) -> list[torch.Tensor]:
    """Elementwise max over all ranks (e.g. per-head max attention logits for MuonClip's QK-clip)."""
    if mesh is None or mesh.world_size == 1 or not values:
        return values
    shapes = [v.shape for v in values]
    flat = torch.cat([v.detach().float().reshape(-1) for v in values])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=mesh.dp.get_group())
    return [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]


def mean_across_ranks(x: torch.Tensor, mesh: ParallelMesh | None) -> torch.Tensor:
    """A scalar averaged over the data-parallel ranks (e.g. the loss, for logging)."""
    if mesh is None or mesh.world_size == 1:
        return x.detach()
    y = x.detach().float().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=mesh.dp.get_group())
    return y / mesh.world_size
