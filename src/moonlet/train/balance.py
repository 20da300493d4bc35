"""MoE load balancing outside autograd: the auxiliary-loss-free bias update (DeepSeek-V3).

After each optimizer step every noaux_tc router's selection bias moves toward balance:
    b_i <- b_i + gamma * sign(mean_load - load_i)
(overloaded experts become less attractive, underloaded ones more), where load_i counts the
(token, expert) assignments of the whole step (all micro-batches, all ranks). The gate weights use
the unbiased scores, so the bias changes who is chosen, not how much they count.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE


@torch.no_grad()
def update_expert_bias_(router: nn.Module, load_E: torch.Tensor, gamma: float) -> None:
    """One router's bias step; load_E [E] (counts, any dtype)."""
    bias = router.e_score_correction_bias
    if bias is None or gamma == 0:
        return
    load = load_E.to(device=bias.device, dtype=torch.float32)
    bias.add_(gamma * torch.sign(load.mean() - load))


def imbalance(load_E: torch.Tensor) -> float:
    """max load / mean load (1.0 = perfectly balanced)."""
    load = load_E.float()
    return float(load.max() / load.mean().clamp_min(1e-9))


class ExpertLoadTracker:
    """Sums each MoE layer's expert load over the training forwards of one optimizer step.

    Forward hooks (on the main layers and the MTP depths alike); a forward recomputed under
    activation checkpointing overwrites rather than adds, because `collect()` is called once after
    each micro-batch's forward."""

    def __init__(self, model: nn.Module):
        self.layers: list[MoE] = [m for m in model.modules() if isinstance(m, MoE)]
        self._last: dict[int, torch.Tensor] = {}
        self.total: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, output):
            if module.training:
                self._last[i] = output[1].load_E.detach()
        return hook

    def collect(self) -> None:
        """Add the loads of the forward that just ran."""
        for i, load in self._last.items():
            self.total[i] = load.clone() if self.total[i] is None else self.total[i] + load
        self._last.clear()

    def take(self) -> list[torch.Tensor | None]:
        """The step's loads per MoE layer (None if the layer did not run), and reset."""
        out, self.total = self.total, [None] * len(self.layers)
        self._last.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
