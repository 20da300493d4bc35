"""Small evaluation helpers for the trainer and `moonlet demo`: validation loss, a plain sampling
loop, arithmetic accuracy, and the unigram baseline.

Stand-ins until the engine (moonlet.infer) and the eval harness (moonlet.eval) land; they use only
the model's public forward with a latent cache, so they stay correct (not fast).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import IGNORE_INDEX
from ..data.tasks import Problem, check
from ..model import LayerCache


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


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, stop_ids: Sequence[int] = (), seed: int = 0) -> list[list[int]]:
    """Sample continuations of a batch of prompts (ragged lengths) with a latent KV cache.

    Returns the new tokens of each prompt, cut after the first stop token (which is kept)."""
    model.eval()
    cfg = model.config
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    if int(lens.min()) == 0:
        raise ValueError("empty prompt")
    max_len = int(lens.max()) + max_new_tokens
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens ({max_len}) exceeds max_position_embeddings ({cfg.max_position_embeddings})")
    dev = model.device
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = [LayerCache(torch.zeros(B, max_len, width, device=dev, dtype=model.dtype)) for _ in range(cfg.num_hidden_layers)]
    ids = torch.full((B, int(lens.max())), cfg.pad_token_id or 0, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(list(p))
    T = ids.shape[1]
    # right-padded prefill: pad slots past a prompt's end are overwritten before any query can see them
    logits = model(ids.to(dev), positions=torch.arange(T, device=dev).expand(B, T), cache=cache).logits
    last = logits[torch.arange(B), (lens - 1).to(dev)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pos = lens.clone().to(dev)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        nxt = _sample(last.float().cpu(), temperature, top_k, gen)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in stop
        if all(done):
            break
        logits = model(nxt[:, None].to(dev), positions=pos[:, None], cache=cache).logits
        last = logits[:, -1]
        pos = pos + 1
    return out


def _sample(logits_BV: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=gen)[:, 0]


def answer(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Chat-template each question as a user turn and decode the assistant's reply (greedy by default)."""
    replies: list[str] = []
    stops = [i for i in (tokenizer.eot_id, tokenizer.eos_id) if i is not None]
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in chunk]
        for toks in generate(model, prompts, max_new_tokens, temperature=temperature, stop_ids=stops, seed=seed + i):
            replies.append(tokenizer.decode(toks, skip_special=True).strip())
    return replies


def arithmetic_accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int = 48,
                        batch_size: int = 32) -> dict:
    """Greedy answers to the problems, graded by `moonlet.data.tasks.check`."""
    replies = answer(model, tokenizer, [p.prompt for p in problems], max_new_tokens, batch_size)
    by_level: dict[int, list[bool]] = defaultdict(list)
    by_task: dict[str, list[bool]] = defaultdict(list)
    ok_all = []
    for p, r in zip(problems, replies):
        ok = check(p, r)
        ok_all.append(ok)
        by_level[p.level].append(ok)
        by_task[p.task].append(ok)
    acc = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"accuracy": acc(ok_all), "n": len(ok_all),
            "by_level": {lv: acc(v) for lv, v in sorted(by_level.items())},
            "by_task": {t: acc(v) for t, v in sorted(by_task.items())},
            "examples": [(p.prompt, r, p.answer, ok) for p, r, ok in list(zip(problems, replies, ok_all))[:8]]}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


__all__ = ["validation_loss", "unigram_cross_entropy", "unigram_entropy", "generate", "answer",
           "arithmetic_accuracy", "perplexity"]
