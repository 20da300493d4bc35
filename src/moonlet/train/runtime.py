"""`Runtime`: where the trainer touches the process topology. Single process here.

Everything the trainer does that changes under torch.distributed goes through this object, so a
distributed runtime (moonlet.dist: FSDP2 + expert parallel) is a subclass overriding these methods
and the trainer loop stays the same:

    device / rank / world_size / is_main      data sharding, logging and checkpoint writing on rank 0
    wrap_model(model)                          FSDP2 / EP wrapping (here: activation checkpointing, if asked)
    unwrap_model(model)                        the CausalLM whose state is saved
    all_reduce(t, op)                          losses (mean), expert loads (sum), max logits (max)
    clip_grad_norm_(params, max_norm)          total norm over (possibly sharded) gradients
    barrier()
    model_state_for_save(model)                a CausalLM (full tensors) to write as safetensors
    optimizer_state_for_save(opt)              optimizer state dict to write (rank 0)
    load_optimizer_state(opt, state)
    prepare_optimizer(opt)                     make an optimizer shard-aware (Muon's orthogonalization)
    scale_rows_(param, row_scale)              QK-clip's per-row scaling of a (sharded) weight
    skip_microbatch(batch) / loss_is_finite(loss)   decisions every rank must take alike
    normalize_losses(out, batch)               per-rank token means -> shares of the global mean
    main_first()                               rank 0 prepares shared files (tokenizer, data cache) first
    load_model(path, resume) / save_checkpoint(...) / load_checkpoint(...)   checkpoint I/O
    close()                                    end of the run
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
from torch import nn

from .optim import scale_rows_plain


def launch_world_size() -> int:
    """Processes of this launch (torchrun sets WORLD_SIZE; 1 for a plain `python -m moonlet`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Runtime:
    def __init__(self, device: str | torch.device = "cpu", activation_checkpointing: bool = False):
        self.device = torch.device(device)
        self.activation_checkpointing = activation_checkpointing

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.activation_checkpointing:
            checkpoint_blocks(model)
        return model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """op: "sum" | "mean" | "max". Identity on one process."""
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"unknown reduce op {op!r}")
        return t

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip in place (max_norm <= 0: no clipping) and return the total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def barrier(self) -> None:
        pass

    def model_state_for_save(self, model: nn.Module) -> nn.Module:
        return self.unwrap_model(model)

    def optimizer_state_for_save(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
        if state is not None:  # None: restored from a sharded run's checkpoint by load_checkpoint
            optimizer.load_state_dict(state)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    @torch.no_grad()
    def scale_rows_(self, param: torch.Tensor, row_scale_R: torch.Tensor) -> None:
        scale_rows_plain(param, row_scale_R)

    def skip_microbatch(self, batch) -> bool:
        """A micro-batch with no loss tokens is skipped (on every rank alike when sharded)."""
        return batch.n_loss_tokens == 0

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Whether to backpropagate this micro-batch (all ranks agree when sharded)."""
        return bool(torch.isfinite(loss.detach()))

    def normalize_losses(self, out, batch) -> None:
        """Rescale out.ce_loss / out.mtp_losses in place so that the data-parallel gradient average
        equals the gradient of the global token mean. Nothing to do on one process."""

    @contextlib.contextmanager
    def main_first(self):
        yield

    def load_model(self, path: str | Path, resume: bool = False) -> nn.Module:
        """The model of a checkpoint: to resume (`resume`) or to start from (--init)."""
        from .checkpoint import load_model

        return load_model(path)

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state, info: dict, tokenizer=None, keep_last: int = 3,
                        final: bool = False) -> Path | None:
        """Write checkpoint `step` (trainer_state: a callable returning the trainer's state dict).
        `final`: the run's last save (a sharded runtime also writes consolidated weights then)."""
        from .checkpoint import save_checkpoint

        path = None
        if self.is_main:
            path = save_checkpoint(run_dir, step, self.model_state_for_save(model), trainer_state(), info,
                                   tokenizer, keep_last)
        self.barrier()
        return path

    def load_checkpoint(self, ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The trainer state to resume from (the weights were loaded with the model)."""
        from .checkpoint import DISTRIBUTED, has_distributed_state, load_trainer_state

        state = load_trainer_state(ckpt)
        if state.get("optimizer") is None and has_distributed_state(ckpt):  # saved by a sharded run
            from ..dist.checkpoint import load_optimizer_offline

            load_optimizer_offline(Path(ckpt) / DISTRIBUTED, model, optimizer)
        return state

    def close(self) -> None:
        pass


def checkpoint_blocks(model: nn.Module, early_stop: bool = True) -> None:
    """Recompute each decoder and MTP block's activations in the backward pass (in place).

    The one activation-checkpointing wrapper: the single-process runtime and dist.parallelize (before
    fully_shard) both call it. early_stop=False makes recomputation replay the whole block, so every
    expert-parallel rank issues the same all-to-alls whatever tensors its own graph happens to need."""
    for block in [*model.model.layers, *model.mtp]:
        block.forward = functools.partial(_checkpointed, block.forward, early_stop)


def _checkpointed(forward, early_stop: bool, *args, **kwargs):
    """A block's forward whose activations are recomputed in the backward pass."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    with set_checkpoint_early_stop(early_stop):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
