"""The trainer's own yardsticks: validation loss on packed batches and the unigram baseline.

Generation and task accuracy live in moonlet.infer (the engine) and moonlet.eval (the harness).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import IGNORE_INDEX


@torch.no_grad()
def validation_loss(model, loader, max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over `loader.eval_batches` (main head only)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader.eval_batches(max_batches):
        logits = model(batch.input_ids.to(model.device), run_mtp=False).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), batch.labels.to(model.device).reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += batch.n_loss_tokens
    model.train(was_training)
    return total / max(1, count)


def unigram_cross_entropy(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Loss (nats/token) of the best context-free model: train unigram frequencies (add-one
    smoothed) scored on the validation tokens. A model has learned context once it is well below."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_tokens].mean())


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the unigram distribution of `tokens`."""
    c = np.bincount(tokens).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


__all__ = ["validation_loss", "unigram_cross_entropy", "unigram_entropy", "generate", "answer",
           "arithmetic_accuracy", "perplexity"]
