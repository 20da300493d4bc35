"""The DeepSeek-V3 / Kimi-K2 model family as plain nn.Modules (no training, serving or CLI code)."""

from .attention import MLA, AttnContext
from .block import Block, LayerCache, allocate_cache
from .moe import MLP, MoE, Router, Experts, Routing
from .mtp import MTPModule
from .transformer import CausalLM, ModelOutput, Transformer, IGNORE_INDEX

__all__ = ["MLA", "AttnContext", "Block", "LayerCache", "allocate_cache", "MLP", "MoE", "Router", "Experts", "Routing",
           "MTPModule", "CausalLM", "ModelOutput", "Transformer", "IGNORE_INDEX"]
