"""Cross-entropy over the vocabulary without materializing fp32 log-probabilities.

`F.cross_entropy(logits.float(), ...)` makes an fp32 copy of the [N, V] logits, an fp32 log-softmax
it keeps for backward, and in backward a zero-filled [N, V] gradient plus two more passes. Here the
forward reads the logits once for the log-sum-exp (in fp32) and keeps only the logits (in their own
dtype) and the [N] log-sum-exps; the backward writes d(loss)/d(logits) = (softmax - onehot) / n in one
expression, in the logits' dtype. Same value and gradient as F.cross_entropy on the upcast logits
(mean over non-ignored rows).
"""

from __future__ import annotations

import torch


_CHUNK_ELEMS = 1 << 20  # fp32 scratch per row-chunk (4 MB): stays in cache between the passes


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
        N, V = logits_NV.shape
        valid = target_N != ignore_index
        safe_t = torch.where(valid, target_N, 0)
        rows = max(1, _CHUNK_ELEMS // V)
        acc = torch.promote_types(logits_NV.dtype, torch.float32)
        lse = torch.cat([torch.logsumexp(logits_NV[i:i + rows].to(acc), dim=-1) for i in range(0, N, rows)])
        picked = logits_NV.gather(1, safe_t[:, None]).squeeze(1).to(acc)
        n = valid.sum()
        loss = ((lse - picked) * valid).sum() / n  # nan when no row is valid, like F.cross_entropy
        ctx.save_for_backward(logits_NV, safe_t, valid, lse, n)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_t, valid, lse, n = ctx.saved_tensors
        N, V = logits.shape
        scale = (grad_loss / n) * valid.to(lse.dtype)  # [N]: 0 for ignored rows
        grad = torch.empty_like(logits)
        rows = max(1, _CHUNK_ELEMS // V)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            p = torch.sub(logits[i:j], lse[i:j, None]).exp_()  # softmax rows: a new >= fp32 scratch tensor
            p.scatter_add_(1, safe_t[i:j, None], torch.full((j - i, 1), -1.0, dtype=p.dtype, device=p.device))
            torch.mul(p, scale[i:j, None], out=grad[i:j])  # scale and cast to the logits' dtype in one pass
        return grad, None, None


def cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype) against targets [N]; the scalar is at least fp32."""
    if torch.is_autocast_enabled(logits_NV.device.type):
        with torch.autocast(logits_NV.device.type, enabled=False):
            return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
    return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
