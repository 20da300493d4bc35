"""Where each moonlet tensor lives in a DeepSeek-V3-format checkpoint.

On disk (DeepSeek's release, transformers 5.23's `save_pretrained`, moonlet's own checkpoints):
  model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   one matrix per routed expert
  model.layers.{L+k}.*                                            MTP depth k (L = num_hidden_layers)
  model.layers.{L+k}.embed_tokens.weight / .shared_head.head.weight   copies of the embedding / head
  lm_head.weight                                                  absent when tie_word_embeddings
In memory moonlet stacks each layer's experts (`mlp.experts.gate_proj` [E, I, D], `down_proj`
[E, D, I]) and keeps MTP depth k in `mtp.{k}`. transformers' in-memory layout (fused
`mlp.experts.gate_up_proj` [E, 2I, D] and `mlp.experts.down_proj`) is also read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import CausalLM

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# tensors some checkpoints carry that no model needs (old transformers saved RoPE frequencies)
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Entry:
    """One tensor of the HF checkpoint and where it goes in moonlet's state dict."""

    hf_name: str
    moonlet_name: str
    expert: int | None  # index into the stacked [E, ...] moonlet tensor, else None
    shape: tuple[int, ...]  # shape of the checkpoint tensor
    copy: bool = False  # a duplicate DeepSeek stores for each MTP depth (embedding / head)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of moonlet's state dict for `cfg` (name -> (shape, dtype)), allocating nothing."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}


def hf_name(cfg: ModelConfig, moonlet_name: str) -> str:
    """A non-expert moonlet name -> its checkpoint name (MTP depth k -> layer L + k)."""
    if moonlet_name.startswith("mtp."):
        k, rest = moonlet_name[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    return moonlet_name


def hf_entries(cfg: ModelConfig, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
               with_copies: bool = True) -> list[Entry]:
    """The checkpoint tensors of `cfg`, in state-dict order (layer by layer, so shards stay layer-local)."""
    shapes = model_shapes(cfg) if shapes is None else shapes
    out: list[Entry] = []
    for name, (shape, _) in shapes.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _STACKED.match(name)
        if m:
            prefix, proj = hf_name(cfg, m.group(1)), m.group(2)
            out.extend(Entry(f"{prefix}.{e}.{proj}.weight", name, e, shape[1:]) for e in range(shape[0]))
        else:
            out.append(Entry(hf_name(cfg, name), name, None, shape))
    if with_copies:
        L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        emb, head = shapes["model.embed_tokens.weight"][0], shapes["lm_head.weight"][0]
        for k in range(D):
            out.append(Entry(f"model.layers.{L + k}.embed_tokens.weight", "model.embed_tokens.weight", None, emb, True))
            out.append(Entry(f"model.layers.{L + k}.shared_head.head.weight", "lm_head.weight", None, head, True))
    return out


def fused_source(entry: Entry, cfg: ModelConfig) -> tuple[str, tuple, tuple[int, ...]] | None:
    """For a per-expert entry: (fused tensor name, index into it, expected fused shape) in transformers'
    in-memory layout, where gate and up are one [E, 2I, D] tensor (gate rows first)."""
    if entry.expert is None:
        return None
    m = _STACKED.match(entry.moonlet_name)
    prefix, proj = hf_name(cfg, m.group(1)), m.group(2)
    E = cfg.n_routed_experts
    if proj == "down_proj":
        return f"{prefix}.down_proj", (entry.expert,), (E, *entry.shape)
    I, D = entry.shape
    rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
    return f"{prefix}.gate_up_proj", (entry.expert, rows), (E, 2 * I, D)


def mtp_layer_prefixes(cfg: ModelConfig, depths: int | None = None) -> list[str]:
    L = cfg.num_hidden_layers
    D = cfg.num_nextn_predict_layers if depths is None else depths
    return [f"model.layers.{L + k}." for k in range(D)]


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
