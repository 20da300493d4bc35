"""Sampling: `SamplingParams` and the logits -> next-token pipeline of one request.

Order (as vLLM / HF): penalties on the raw logits -> temperature -> top-k -> top-p -> min-p ->
sample with the request's own `torch.Generator` (so a seed gives the same tokens whatever else is
in the batch). temperature 0 is greedy (argmax of the penalized logits). Logprobs are reported
from the model's raw distribution (log-softmax of the unpenalized logits), as the OpenAI API does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL form over prompt + output tokens (1 = off)
    frequency_penalty: float = 0.0  # OpenAI form over output tokens: -= f * count
    presence_penalty: float = 0.0  # OpenAI form over output tokens: -= p * (count > 0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a single string is a common slip; treat it as one stop string
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


class SamplerState:
    """Per-request sampling state: its generator and the token counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(1 << 62)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen_V = self.counts_V = None
        if params.penalized:
            self.seen_V = torch.zeros(vocab_size, dtype=torch.bool)  # prompt + output (repetition penalty)
            if prompt_ids:
                self.seen_V[torch.tensor(prompt_ids).clamp(0, vocab_size - 1)] = True
            self.counts_V = torch.zeros(vocab_size)  # output only (frequency / presence)

    def update(self, token: int) -> None:
        if self.counts_V is not None and 0 <= token < self.counts_V.numel():
            self.seen_V[token] = True
            self.counts_V[token] += 1

    def penalize(self, logits_V: torch.Tensor, extra: list[int] = ()) -> torch.Tensor:
        """Penalties on float32 logits, counting `extra` (speculative drafts) as already generated."""
        p = self.params
        if not p.penalized:
            return logits_V
        seen, counts = self.seen_V, self.counts_V
        if extra:
            seen, counts = seen.clone(), counts.clone()
            for t in extra:
                seen[t] = True
                counts[t] += 1
        if p.repetition_penalty != 1.0:
            pen = torch.where(logits_V > 0, logits_V / p.repetition_penalty, logits_V * p.repetition_penalty)
            logits_V = torch.where(seen, pen, logits_V)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            logits_V = logits_V - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        return logits_V


def probs_from_logits(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [V] (float32) of already-penalized logits at temperature > 0."""
    logits = logits_V.float() / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = sp.cumsum(0) - sp >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(0, si[drop], 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0 or params.min_p > 0.0:
        probs = probs / probs.sum()
    return probs


def sample_token(logits_V: torch.Tensor, state: SamplerState, extra: list[int] = ()) -> tuple[int, torch.Tensor | None]:
    """(token, sampling distribution or None when greedy) for one request's logits [V]."""
    logits = state.penalize(logits_V.float(), extra)
    if state.params.greedy:
        return int(logits.argmax()), None
    probs = probs_from_logits(logits, state.params)
    return int(torch.multinomial(probs, 1, generator=state.generator)), probs


def token_logprobs(logits_V: torch.Tensor, token: int, top_n: int) -> dict:
    """{"token_id", "logprob", "top_logprobs": [(id, logprob), ...]} from the raw logits."""
    lp = logits_V.float().log_softmax(-1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        v, i = lp.topk(min(top_n, lp.numel()))
        top = [(int(a), float(b)) for a, b in zip(i.tolist(), v.tolist())]
    return {"token_id": token, "logprob": float(lp[token]), "top_logprobs": top}
