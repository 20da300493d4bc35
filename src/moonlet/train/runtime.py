"""`Runtime`: where the trainer touches the process topology. Single process here.

Everything the trainer does that changes under torch.distributed goes through this object, so a
distributed runtime (moonlet.dist: FSDP2 + expert parallel) is a subclass overriding these methods
and the trainer loop stays the same:

    device / rank / world_size / is_main      data sharding, logging and checkpoint writing on rank 0
    wrap_model(model)                          FSDP2 / EP wrapping (identity here)
    unwrap_model(model)                        the CausalLM whose state is saved
    all_reduce(t, op)                          losses (mean), expert loads (sum), max logits (max)
    clip_grad_norm_(params, max_norm)          total norm over (possibly sharded) gradients
    barrier()
    model_state_for_save(model)                a CausalLM (full tensors) to write as safetensors
    optimizer_state_for_save(opt)              optimizer state dict to write (rank 0)
    load_optimizer_state(opt, state)
"""

from __future__ import annotations

import torch
from torch import nn


class Runtime:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
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

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)
