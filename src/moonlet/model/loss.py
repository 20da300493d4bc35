"""Cross-entropy over the vocabulary without materializing fp32 log-probabilities.

`F.cross_entropy(logits.float(), ...)` makes an fp32 copy of the [N, V] logits, an fp32 log-softmax
it keeps for backward, and in backward a zero-filled [N, V] gradient plus two more passes. Here one
pass over row chunks of the logits, through a single reused fp32 scratch buffer (fresh multi-MB
tensors per chunk cost more in page faults than in arithmetic on CPU), gives the log-sum-exps and,
when the logits need a gradient, d(mean loss)/d(logits) = (softmax - onehot) / n already, in the
logits' dtype: backward only scales it by the incoming gradient (nothing when that is 1) and never
reads the logits again. Same value and gradient as F.cross_entropy on the upcast logits (mean over
non-ignored rows).
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
        acc = torch.promote_types(logits_NV.dtype, torch.float32)
        n = valid.sum()
        want_grad = ctx.needs_input_grad[0]
        scale = valid.to(acc) / n  # [N]: d(mean)/d(row loss), 0 for ignored rows
        grad = torch.empty_like(logits_NV) if want_grad else None
        lse = torch.empty(N, dtype=acc, device=logits_NV.device)
        rows = min(N, max(1, _CHUNK_ELEMS // V))
        buf = torch.empty(rows, V, dtype=acc, device=logits_NV.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            b = buf[: j - i]
            b.copy_(logits_NV[i:j])
            mx = b.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(acc).min)  # all -inf row: lse -inf
            s = b.sub_(mx).exp_().sum(dim=-1, keepdim=True)
            lse[i:j] = (mx + s.log()).squeeze(1)
            if want_grad:
                b.mul_(scale[i:j, None] / s)  # softmax / n
                b.scatter_add_(1, safe_t[i:j, None], -scale[i:j, None])
                grad[i:j].copy_(b)
        picked = logits_NV.gather(1, safe_t[:, None]).squeeze(1).to(acc)
        loss = ((lse - picked) * valid).sum() / n  # nan when no row is valid, like F.cross_entropy
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("moonlet cross_entropy: backward ran twice through the same loss")
        if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:  # (a CPU read is free; CUDA would sync)
            grad = grad * grad_loss.to(grad.dtype if grad.dtype == torch.float64 else torch.float32)
        return grad, None, None


def cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype) against targets [N]; the scalar is at least fp32."""
    if torch.is_autocast_enabled(logits_NV.device.type):
        with torch.autocast(logits_NV.device.type, enabled=False):
            return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
    return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
