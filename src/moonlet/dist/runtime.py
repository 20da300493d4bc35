"""`DistRuntime`: the trainer's `Runtime` under torchrun -- FSDP2 + expert parallelism.

`moonlet train` builds one when launched by torchrun (WORLD_SIZE > 1); the trainer loop is the same
code as on one process, and every place it touches the topology lands here:

  wrap_model         `parallelize` over the [dp_shard, ep] mesh (bf16 precision: FSDP mixed precision
                     with fp32 reduction and fp32 routers, plus the trainer's autocast)
  normalize_losses   each rank's CE / MTP losses are means over its own tokens; they are rescaled by
                     n_rank * world / n_global (token counts all-reduced) so that FSDP's gradient
                     average is the gradient of the global-batch token mean, as on one process
  prepare_optimizer  Muon orthogonalizes whole matrices: `orthogonalize_sharded` (gather 2-D
                     updates, per-expert local Newton-Schulz for the stacked experts)
  scale_rows_        QK-clip's per-head row scaling on row-sharded projections
  all_reduce         expert loads (sum: identical bias updates), max logits (max), logged scalars
  clip_grad_norm_    the norm of the unsharded gradient (float64 partial sums, one all-reduce per mesh dim)
  checkpoints        every rank writes its shards with torch.distributed.checkpoint into the
                     checkpoint's `distributed/`; rank 0 adds config, tokenizer, trainer state (the
                     loader position is global, so any world size that keeps the global batch
                     resumes it) and, at the end of the run, the consolidated model.safetensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..data.loader import IGNORE_INDEX
from ..train.checkpoint import DISTRIBUTED, has_distributed_state, load_trainer_state, save_checkpoint
from ..train.optim import Muon
from ..train.runtime import Runtime, launch_world_size
from .checkpoint import consolidated_model, load_distributed, save_distributed
from .mesh import ParallelismError, build_mesh, init_distributed
from .muon import orthogonalize_sharded, scale_rows_
from .parallelize import parallelize
from .reduce import clip_grad_norm_, grad_norm


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class DistRuntime(Runtime):
    def __init__(self, device: str = "cpu", dp_shard: int | None = None, ep: int = 1, precision: str = "fp32",
                 activation_checkpointing: bool = False, timeout_s: float | None = None):
        """timeout_s bounds every collective (default: $MOONLET_DIST_TIMEOUT or 600 s): a rank that
        stalls makes the others fail with a diagnosis instead of waiting forever."""
        timeout_s = float(os.environ.get("MOONLET_DIST_TIMEOUT", "600")) if timeout_s is None else timeout_s
        world = launch_world_size()
        ep = 1 if ep is None else ep
        for flag, v in (("--dp-shard", dp_shard), ("--ep", ep)):
            if v is not None and v < 1:
                raise ParallelismError(f"{flag} must be a positive integer, got {v}")
        if world == 1:  # flags asking for more processes than this launch has: say how to launch
            n = (dp_shard or 1) * ep
            raise ParallelismError(f"--dp-shard {dp_shard or 1} x --ep {ep} = {n} processes, but this is a single "
                                   f"process: launch with `torchrun --nproc-per-node {n} -m moonlet train ...`")
        if dp_shard is None:
            if world % ep:
                raise ParallelismError(f"--ep {ep} does not divide the number of processes ({world})")
            dp_shard = world // ep
        want_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        env = init_distributed(backend="nccl" if want_cuda else "gloo", timeout_s=timeout_s)
        self.env = env
        self.device = env.device if want_cuda else torch.device("cpu")
        self.rank, self.world_size = env.rank, env.world_size
        self.mesh = build_mesh(dp_shard, ep, None, device_type=self.device.type)
        self.precision = precision
        self.activation_checkpointing = activation_checkpointing
        pid = [os.getpid()]
        dist.broadcast_object_list(pid, src=0)  # names rank 0's staging dirs (stale-dir cleanup checks the pid)
        self._pid0 = pid[0]

    def describe(self) -> str:
        return (f"{self.world_size} processes ({self.env.backend}, {self.device.type}), mesh dp_shard "
                f"{self.mesh.dp_shard_size} x ep {self.mesh.ep_size}")

    # ---- model and optimizer -------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        mp = torch.bfloat16 if self.precision == "bf16" else None
        return parallelize(model, self.mesh, mixed_precision=mp,
                           activation_checkpointing=self.activation_checkpointing)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if isinstance(optimizer, Muon):
            optimizer.orthogonalize = orthogonalize_sharded
        return optimizer

    def scale_rows_(self, param: torch.Tensor, row_scale_R: torch.Tensor) -> None:
        scale_rows_(param, row_scale_R)

    # ---- reductions -----------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"unknown reduce op {op!r}")
        y = t.detach().clone()
        if op == "mean" and not y.is_floating_point():
            y = y.double()
        dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return y / self.world_size if op == "mean" else y

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm) if max_norm > 0 else grad_norm(params)

    def skip_microbatch(self, batch) -> bool:
        """Count this micro-batch's loss tokens (main head, each MTP depth) on every rank. A rank with
        none at some head would run that head without a gradient and its FSDP reduction would not
        match its peers', so then every rank skips the micro-batch (rare: fully masked SFT rows).
        One all-reduce (sum) of [counts, count == 0]: a head's summed zero flags are > 0 exactly when
        some rank has no target there (the minimum over ranks is 0); float64 keeps the counts exact."""
        counts = torch.tensor([float((lab != IGNORE_INDEX).sum()) for lab in [batch.labels, *batch.mtp_labels]],
                              dtype=torch.float64, device=self.device)
        both = torch.cat([counts, (counts == 0).double()])
        dist.all_reduce(both)
        total, empty = both.split(len(counts))
        self._counts, self._total = counts, total
        return bool((empty > 0).any())

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def normalize_losses(self, out, batch) -> None:
        depth = len(batch.mtp_labels)
        counts, total = self._counts, self._total  # from skip_microbatch, called for this micro-batch
        w = (counts * self.world_size / total.clamp(min=1)).float()
        if out.ce_loss is not None:
            out.ce_loss = out.ce_loss * w[0]
        if len(out.mtp_losses) == depth:  # every depth has targets here (else skipped above)
            out.mtp_losses = [m * w[k + 1] for k, m in enumerate(out.mtp_losses)]

    def barrier(self) -> None:
        dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (writes tokenizer / token caches), then the others (read them)."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    # ---- checkpoints ----------------------------------------------------------------------------------
    def load_model(self, path: str | Path, resume: bool = False) -> nn.Module:
        from ..config import ModelConfig
        from ..model import CausalLM
        from ..train.checkpoint import load_model

        if resume and has_distributed_state(path):  # the weights come with the shards in load_checkpoint
            return CausalLM(ModelConfig.load(path))
        return load_model(path)

    def optimizer_state_for_save(self, optimizer: torch.optim.Optimizer):
        return None  # in the DCP shards

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state) -> None:
        """None: restored with the shards. A one-process checkpoint's optimizer state dict (full
        tensors, same parameter order): each state tensor is sliced to its parameter's sharding."""
        if state is None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        converted = {}
        for i, st in state["state"].items():
            p = params[int(i)]
            converted[i] = {k: (distribute_tensor(v.to(self.device), p.device_mesh, p.placements, src_data_rank=None)
                                if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v)
                            for k, v in st.items()}
        optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state, info: dict, tokenizer=None, keep_last: int = 3,
                        final: bool = False) -> Path | None:
        root = Path(run_dir) / "checkpoints"
        staged = root / f".tmp_step_{step:07d}_{self._pid0}_shards"
        save_distributed(staged, model, [optimizer])  # collective, atomic (rank 0 renames)
        with _quiet("torch.distributed.tensor._redistribute"):  # "2 sequential all_gathers" for EP experts
            full = consolidated_model(model) if final else None  # collective: gathered to rank 0's CPU
        path = None
        if self.is_main:
            state = trainer_state()
            state["distributed"] = {"world_size": self.world_size, "dp_shard": self.mesh.dp_shard_size,
                                    "ep": self.mesh.ep_size}
            path = save_checkpoint(run_dir, step, full, state, info, tokenizer, keep_last, config=model.config,
                                   add_files=lambda tmp: os.replace(staged, tmp / DISTRIBUTED))
        self.barrier()
        return path

    def load_checkpoint(self, ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        state = load_trainer_state(ckpt)
        if has_distributed_state(ckpt):
            load_distributed(Path(ckpt) / DISTRIBUTED, model, [optimizer])
        return state

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
