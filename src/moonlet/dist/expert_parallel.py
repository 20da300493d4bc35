"""Expert parallelism: routed experts partitioned over the EP ranks, tokens moved by all-to-all.

`ExpertParallelExperts` is a drop-in for `moonlet.model.moe.Experts` (same call, same parameter
names and global shapes), installed by `parallelize`; the model code stays free of collectives.
Its parameters are DTensors sharded by expert over the EP mesh: the global tensor is [E, I, D],
this rank holds experts [r*E/ep, (r+1)*E/ep). One forward, for the N local tokens:

  1. dispatch: each token goes once to every EP rank that owns at least one of its K experts
     (not once per expert: with node-limited routing this caps the bytes, as in DeepSeek-V3),
     together with the K-wide list of its local expert ids there (-1 elsewhere) and their gate
     weights. Send counts are exchanged first (all_to_all of [ep] ints), then one all_to_all of
     [x | w] (differentiable) and one of the ids.
  2. compute: the received (token, local expert) pairs go through the model's own `Experts`
     math on the local weights (token-sorted, experts with no tokens do no work); each received
     token gets sum_k w_k * expert_k(x).
  3. combine: one all_to_all (differentiable) returns the partial sums to the token's rank, where
     they are added per token (index_add_) in the original order.
Autograd flows through the all-to-alls: the backward of an all-to-all is the all-to-all with send
and receive splits swapped. Exactly two differentiable collectives per layer, in a fixed order, so
every rank issues the same backward sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.func import functional_call

from ..model.moe import Experts


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single over dim 0 with variable splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]; rows in_splits[j] go to rank j of `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """E routed experts, E/ep of them on this rank; call signature of `Experts`.

    forward(x_ND, indices_NK (global expert ids), weights_NK) -> y_ND = sum_k w_k * expert_{i_k}(x).
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        E, ep = experts.n_experts, ep_mesh.size()
        if E % ep:
            raise ValueError(f"n_routed_experts ({E}) is not divisible by ep ({ep})")
        self.n_experts, self.ep, self.n_local = E, ep, E // ep
        self.group = ep_mesh.get_group()
        with torch.device("meta"):  # shape-only template: its forward is the expert math (not a submodule)
            self._math = [Experts(self.n_local, experts.gate_proj.shape[2], experts.gate_proj.shape[1])]
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            # every rank holds the same full tensor here: slice locally, no communication
            local = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(self, name, nn.Parameter(local, requires_grad=full.requires_grad))
        # observability of the last forward (tensors, no host sync): pairs sent, max ranks per token
        self.last_sent_tokens: torch.Tensor | None = None
        self.last_max_ranks_per_token: torch.Tensor | None = None

    def _local(self, name: str) -> torch.Tensor:
        w = getattr(self, name)
        return w.to_local() if isinstance(w, DTensor) else w

    def forward(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        N, K = indices_NK.shape
        D, R, El = x_ND.shape[1], self.ep, self.n_local
        dest_NK = indices_NK // El
        # ---- dispatch: unique (rank, token) pairs, grouped by destination rank ----------------------
        hit_RN = torch.zeros(R, N, dtype=torch.bool, device=x_ND.device)
        hit_RN[dest_NK.t(), torch.arange(N, device=x_ND.device).expand(K, N)] = True
        rank_P, tok_P = hit_RN.nonzero(as_tuple=True)
        mine_PK = dest_NK[tok_P] == rank_P[:, None]
        lid_PK = torch.where(mine_PK, indices_NK[tok_P] - rank_P[:, None] * El, -1)
        w_PK = torch.where(mine_PK, weights_NK[tok_P], 0.0).to(x_ND.dtype)  # the model applies them in x's dtype
        send = hit_RN.sum(1)
        self.last_sent_tokens = send.sum()
        self.last_max_ranks_per_token = hit_RN.sum(0).max() if N else send.new_zeros(())
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        payload_MC = all_to_all(torch.cat([x_ND[tok_P], w_PK], dim=1), recv_splits, send_splits, self.group)
        lid_MK = _all_to_all(lid_PK, recv_splits, send_splits, self.group)
        x_MD, w_MK = payload_MC[:, :D], payload_MC[:, D:]
        # ---- compute: each received token through its local experts -------------------------------
        y_MD = self._run_experts(x_MD, lid_MK, w_MK)
        # ---- combine: partial sums back to their tokens' ranks, added in original order ------------
        y_PD = all_to_all(y_MD, send_splits, recv_splits, self.group)
        return torch.zeros_like(x_ND).index_add_(0, tok_P, y_PD)

    def _run_experts(self, x_MD: torch.Tensor, lid_MK: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
        """Each received token's weighted sum over its local experts, by the model's own expert math
        (`Experts.forward` on the local weights, one (token, expert) pair per row)."""
        local = {n: self._local(n) for n in ("gate_proj", "up_proj", "down_proj")}
        m_idx, k_idx = (lid_MK >= 0).nonzero(as_tuple=True)
        if m_idx.numel() == 0:
            # no tokens for this rank's experts: still connect the output to the received payload and
            # to the weights, so this rank runs the dispatch all-to-all's backward like its peers
            # (else they wait forever) and its experts get (zero) gradients for the FSDP reduction
            return x_MD * 0.0 + 0.0 * sum(w.sum() for w in local.values())
        y_QD = functional_call(self._math[0], local, (x_MD[m_idx], lid_MK[m_idx, k_idx, None], w_MK[m_idx, k_idx, None]))
        return torch.zeros_like(x_MD).index_add_(0, m_idx, y_QD)
