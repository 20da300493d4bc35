"""Process-group start-up and the 2-D device mesh (dp_shard x ep) that every other part uses.

Layout: world = dp_shard * ep ranks arranged as a [dp_shard, ep] grid, `ep` the inner (fastest)
dimension, so an expert-parallel group is `ep` consecutive ranks (one node when ep <= GPUs per node:
the all-to-all stays on NVLink). Every rank is a data-parallel rank: it gets its own slice of the
global batch. Parameters are sharded as follows:
  * everything except routed experts: FSDP over all ranks (the flattened "dp" mesh);
  * routed experts: rank (i, j) owns experts [j*E/ep, (j+1)*E/ep) (the "ep" mesh), and FSDP shards
    that block over the dp_shard ranks of its column (the "dp_shard" mesh).
With ep == 1 the experts are sharded like every other parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ModelConfig


class ParallelismError(ValueError):
    """A parallel layout that cannot work for this world size or model; the message names the flag."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without WORLD_SIZE (plain `python ...`) returns a single-process env.

    backend: "nccl" when CUDA is available, else "gloo". timeout_s bounds every collective: a rank
    that dies or stalls makes the others fail with an error after at most this long, never hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0, device, None)
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ParallelismError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible "
                                   f"on this node: --nproc-per-node must not exceed the GPU count")
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kw)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def validate_parallelism(cfg: ModelConfig | None, world_size: int, dp_shard: int, ep: int) -> None:
    """Raise ParallelismError with a specific message for any layout that cannot work."""
    for name, v in (("dp_shard", dp_shard), ("ep", ep)):
        if not isinstance(v, int) or v < 1:
            raise ParallelismError(f"{name} must be a positive integer, got {v!r}")
    if dp_shard * ep != world_size:
        raise ParallelismError(
            f"dp_shard ({dp_shard}) x ep ({ep}) = {dp_shard * ep} does not match the world size ({world_size}): "
            f"choose --dp-shard and --ep so that their product is the number of processes")
    if cfg is None or ep == 1:
        return
    if not cfg.is_moe:
        raise ParallelismError(f"ep ({ep}) > 1 needs routed experts, but the model is dense (n_routed_experts is None)")
    E = cfg.n_routed_experts
    if E % ep:
        raise ParallelismError(f"n_routed_experts ({E}) is not divisible by ep ({ep})")


def max_ranks_per_token(cfg: ModelConfig, ep: int) -> int:
    """Upper bound on the EP ranks one token is sent to (each rank receives a token at most once).

    Node-limited routing as in DeepSeek-V3: experts are partitioned contiguously, so with n_group
    groups a group is a whole number of ranks (ep % n_group == 0) or a rank holds whole groups
    (n_group % ep == 0), and topk_group bounds the ranks a token reaches, hence the all-to-all bytes.
    """
    K, G, TG = cfg.num_experts_per_tok, cfg.n_group or 1, cfg.topk_group or 1
    bound = min(K, ep)
    group_limited = cfg.topk_method in ("noaux_tc", "group_limited_greedy") and G > 1
    if group_limited and ep % G == 0:
        bound = min(bound, TG * (ep // G))
    elif group_limited and G % ep == 0:
        bound = min(bound, TG)
    return bound


@dataclass
class ParallelMesh:
    """The device meshes of one run. `world` is [dp_shard, ep]; `dp` is its flattening (all ranks)."""

    world: DeviceMesh
    dp: DeviceMesh  # all ranks: FSDP mesh of non-expert parameters, data-parallel reductions
    dp_shard: DeviceMesh  # this rank's column: FSDP mesh of its expert block
    ep: DeviceMesh  # this rank's row: the all-to-all group

    @property
    def dp_shard_size(self) -> int:
        return self.world.size(0)

    @property
    def ep_size(self) -> int:
        return self.world.size(1)

    @property
    def world_size(self) -> int:
        return self.world.size()

    @property
    def rank(self) -> int:
        return self.world.get_rank()

    @property
    def device_type(self) -> str:
        return self.world.device_type


def build_mesh(dp_shard: int | None = None, ep: int = 1, cfg: ModelConfig | None = None,
               device_type: str | None = None) -> ParallelMesh:
    """The [dp_shard, ep] mesh over the default process group (dp_shard None: world // ep).

    Validates the layout (and, given the model config, the expert count) before any group is made."""
    if not dist.is_initialized():
        raise ParallelismError("torch.distributed is not initialized: call init_distributed() first "
                               "(launch with torchrun for more than one process)")
    world = dist.get_world_size()
    if dp_shard is None:
        if ep < 1 or world % ep:
            raise ParallelismError(f"ep ({ep}) does not divide the world size ({world})")
        dp_shard = world // ep
    validate_parallelism(cfg, world, dp_shard, ep)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (dp_shard, ep), mesh_dim_names=("dp_shard", "ep"))
    dp = mesh._flatten("dp")
    return ParallelMesh(world=mesh, dp=dp, dp_shard=mesh["dp_shard"], ep=mesh["ep"])


def shard_batch(x_B: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """This rank's rows of a global batch [B, ...] (contiguous blocks, rank order of the dp mesh)."""
    B, n = x_B.shape[0], mesh.dp.size()
    if B % n:
        raise ParallelismError(f"global batch ({B}) is not divisible by the data-parallel size ({n})")
    r = mesh.dp.get_local_rank()
    return x_B[r * (B // n):(r + 1) * (B // n)]
