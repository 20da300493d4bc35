"""Inference: latent KV cache, sampling, continuous batching, MTP speculative decoding."""

from .engine import Engine, GenerationResult, SamplingParams, Scheduler, TokenEvent

__all__ = ["Engine", "GenerationResult", "SamplingParams", "Scheduler", "TokenEvent"]
