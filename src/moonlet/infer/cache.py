"""The KV cache manager: one preallocated latent cache [max_batch, max_seq] per layer, rows handed
to sequences.

Each running sequence owns one row; its token at position p lives in slot p of that row (the model
writes latents at slots = positions). Running sequences are kept in rows 0..n-1 (a freed row is
filled by moving the last row into it), so a decode step runs over one contiguous view and the
batch shrinks at once when a sequence finishes. Nothing is allocated per step.

What a token costs is MLA's latent: RMSNorm(c_kv) + roped k_pe = kv_lora_rank + qk_rope_head_dim
numbers per layer (plus DSA's index key and Engram's history when those levers are on).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from ..config import ModelConfig
from ..model.block import LayerCache, allocate_cache


class KVCache:
    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, mtp: bool = True):
        if max_batch < 1 or max_seq < 2:
            raise ValueError(f"cache needs max_batch >= 1 and max_seq >= 2, got {max_batch} x {max_seq}")
        self.cfg, self.max_batch, self.max_seq = cfg, max_batch, max_seq
        self.layers: list[LayerCache] = allocate_cache(cfg, max_batch, max_seq, dtype, device, mtp=mtp)
        self.lengths = [0] * max_batch  # tokens written per row

    # ---- sizes -----------------------------------------------------------------------------------
    def bytes_per_token(self, include_mtp: bool = False) -> int:
        """Exact bytes one token occupies over the main layers (and the MTP depths if asked)."""
        n = self.cfg.num_hidden_layers + (len(self.layers) - self.cfg.num_hidden_layers if include_mtp else 0)
        total = 0
        for lc in self.layers[:n]:
            for f in fields(lc):
                t = getattr(lc, f.name)
                if t is not None:
                    total += t[0, 0].numel() * t.element_size()
        return total

    @property
    def nbytes(self) -> int:
        return sum(getattr(lc, f.name).nbytes for lc in self.layers for f in fields(lc)
                   if getattr(lc, f.name) is not None)

    # ---- rows ------------------------------------------------------------------------------------
    def view(self, start: int, stop: int) -> list[LayerCache]:
        """Per-layer caches of rows [start, stop) (views: the model's writes land in this cache)."""
        return [LayerCache(**{f.name: (None if getattr(lc, f.name) is None else getattr(lc, f.name)[start:stop])
                              for f in fields(lc)}) for lc in self.layers]

    def move(self, src: int, dst: int) -> None:
        """Copy row src's written slots into row dst (compaction after dst was freed)."""
        n = self.lengths[src]
        if src != dst and n:
            for lc in self.layers:
                for f in fields(lc):
                    t = getattr(lc, f.name)
                    if t is not None:
                        t[dst, :n] = t[src, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0
