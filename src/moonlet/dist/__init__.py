"""moonlet on torch.distributed: FSDP2 sharding, expert parallelism, distributed checkpoints.

Typical use (every rank runs the same code, launched by torchrun):

    env = init_distributed()                       # nccl on GPUs, gloo on CPU
    mesh = build_mesh(dp_shard=None, ep=2, cfg=model.config)
    model = parallelize(model.to(env.device), mesh, mixed_precision=torch.bfloat16)
    ...  loss.backward(); clip_grad_norm_(model.parameters(), 1.0); opt.step()
    loads = all_reduce_expert_load(out.expert_load, mesh)   # then the bias update
    save_distributed(dir, model, [opt]); load_distributed(dir, model, [opt])
    export_hf(model, out_dir)
"""

from .checkpoint import export_hf, full_state_dict, load_distributed, save_distributed
from .expert_parallel import ExpertParallelExperts, all_to_all
from .failure import exit_on_failure
from .mesh import (DistEnv, ParallelismError, ParallelMesh, build_mesh, init_distributed, max_ranks_per_token,
                   shard_batch, validate_parallelism)
from .muon import orthogonalize_sharded, scale_rows_
from .parallelize import parallelize
from .reduce import all_reduce_expert_load, all_reduce_max, clip_grad_norm_, grad_norm, mean_across_ranks

__all__ = [
    "DistEnv", "ExpertParallelExperts", "ParallelMesh", "ParallelismError", "all_reduce_expert_load",
    "all_reduce_max", "all_to_all", "build_mesh", "clip_grad_norm_", "exit_on_failure", "export_hf",
    "full_state_dict", "grad_norm", "init_distributed", "load_distributed", "max_ranks_per_token", "mean_across_ranks",
    "orthogonalize_sharded", "parallelize", "save_distributed", "scale_rows_", "shard_batch",
    "validate_parallelism",
]
