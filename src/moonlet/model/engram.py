"""Engram: conditional memory by hashed suffix n-gram lookup (Cheng et al., arXiv 2601.07372).

At a few configured layers, before attention, each position t looks up its suffix n-grams
(n = 2..N) of (optionally tokenizer-compressed) token ids in K hashed tables per order, concatenates
the rows into e_t [d_mem], gates the value projection of e_t against the hidden state, refines it
with a short causal depthwise convolution and adds it to the residual stream:

    k_m = W_K^m e ; v = W_V e                                     (W_V shared, W_K per stream m)
    g_m = <RMSNorm(h_m), RMSNorm(k_m)> / sqrt(D) ; alpha_m = sigmoid(sign(g_m) sqrt(|g_m|))
    V_m = alpha_m v ;  Y = V + SiLU(CausalDepthwiseConv(RMSNorm_m(V), kernel 4, dilation N))
    h_m <- h_m + Y_m

Facts follow DeepSeek's `engram_demo_v1.py` (the primary code): multiply-XOR hashing with odd
multipliers, one mix per order shared by its heads, distinct prime table sizes across all layers,
orders and heads (first unused prime >= the requested size), linear layers with bias, the demo's
sign-sqrt gate (the paper's summarised formula has no sqrt; we follow the code), conv without bias.
Differences, all deliberate (docs/LOG.md 2026-11-24): the conv is zero-initialised (the paper's
setup; the demo leaves PyTorch's init), the multipliers come from a splitmix64 stream of
(engram_seed, layer, j) rather than numpy's RNG (reproducible without numpy, hand-checkable), and
their range is bounded by the model vocabulary (not the compressed one) so the hash depends on the
config alone. All RMSNorms use rms_norm_eps (the demo: dtype eps, 1e-5 in the conv). With mHC the
module is branch-aware (M = hc_mult streams: per-stream W_K, norms, gates and conv channels, shared
tables and W_V); without, M = 1.

Addresses depend on token ids only, so the rows of every Engram layer are gathered at the start of
the forward (`prefetch_rows`), on whatever device the tables live (e.g. host memory, see
`place_tables`), and moved to the model's device before the first block runs.

Decode state per Engram layer (`LayerCache.engram_*`, indexed by position like the latent cache):
the compressed ids (for the n-gram suffixes), the gathered rows e_t and the gates alpha_t (for the
conv's (kernel-1)*dilation positions of history; v = W_V e is recomputed for those taps).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

INT64_MAX = 2**63 - 1
_MASK64 = 2**64 - 1


# ---- hashing (pure) --------------------------------------------------------------------------------
def table_sizes(cfg: ModelConfig) -> dict[int, list[int]]:
    """Rows of every head's table: {layer: [order 2 heads..., order 3 heads..., ...]}, all distinct
    primes, each the first unused prime >= the requested size (DeepSeek's demo scheme)."""
    from sympy import isprime  # (lazy: only Engram models pay its import)

    seen: set[int] = set()
    out: dict[int, list[int]] = {}
    for layer in cfg.engram_layers or []:
        sizes = []
        for want in cfg.engram_table_sizes:
            p = want - 1
            for _ in range(cfg.engram_heads_per_order):
                p += 1
                while not isprime(p) or p in seen:
                    p += 1
                seen.add(p)
                sizes.append(p)
        out[layer] = sizes
    return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def multipliers(cfg: ModelConfig, layer: int) -> list[int]:
    """N odd multipliers r_j = 2u+1 for layer `layer`, u uniform-ish in [0, half_bound) with
    half_bound = (INT64_MAX // vocab_size) // 2, so x * r_j never overflows int64 for any id x < vocab."""
    half = max(1, (INT64_MAX // cfg.vocab_size) // 2)
    state = _splitmix64((cfg.engram_seed * 1_000_003 + 10007 * layer) & _MASK64)
    out = []
    for j in range(cfg.engram_max_ngram):
        state = _splitmix64(state + j)
        out.append(2 * (state % half) + 1)
    return out


def ngram_hashes(ids_BT: torch.Tensor, history_BTk: torch.Tensor, mults: Sequence[int],
                 sizes: Sequence[int], heads_per_order: int) -> torch.Tensor:
    """Slot of every head for every position, [B, T, (N-1) * heads] int64 (offsets not added).

    ids_BT: the (compressed) id at each position; history_BTk [B, T, N-1]: the ids at t-1, t-2, ...
    (pad id before the sequence start). mix_n = XOR_{j<n} id_{t-j} * r_j ; slot = mix_n mod size."""
    toks = [ids_BT] + list(history_BTk.unbind(-1))
    mix = ids_BT * mults[0]
    out = []
    for n in range(2, len(mults) + 1):
        mix = torch.bitwise_xor(mix, toks[n - 1] * mults[n - 1])
        for h in range(heads_per_order):
            out.append(torch.remainder(mix, sizes[(n - 2) * heads_per_order + h]))
    return torch.stack(out, dim=-1)


# ---- tokenizer compression --------------------------------------------------------------------------
_WS = re.compile(r"[ \t\r\n]+")


def normalize_token_text(text: str) -> str:
    """The demo's canonical form: NFKC, NFD, strip accents, lowercase, collapse whitespace, strip
    (a token that is only whitespace stays a single space)."""
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = _WS.sub(" ", t)
    return " " if t == " " else t.strip()


def build_compression_map(decoded: Sequence[str], raw_tokens: Sequence[str] | None = None) -> list[int]:
    """old id -> new id, merging ids whose decoded text normalizes to the same string.

    decoded[i]: the text of token i alone; raw_tokens[i]: its vocabulary string, used as the key for
    byte pieces that decode to U+FFFD (so they stay distinct). Returns a list of len(decoded)."""
    key_to_new: dict[str, int] = {}
    out = []
    for i, text in enumerate(decoded):
        if "\ufffd" in text:
            key = "\x00raw:" + (raw_tokens[i] if raw_tokens is not None else str(i))
        else:
            norm = normalize_token_text(text)
            key = norm if norm else text
        out.append(key_to_new.setdefault(key, len(key_to_new)))
    return out


class EngramHashing(nn.Module):
    """Model-level hashing state: the optional compression map (a checkpoint buffer, `compress_map`)
    and, derived from the config alone (plain Python ints, nothing to save or re-materialize), each
    layer's multipliers and prime table sizes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = list(cfg.engram_layers or [])
        self.max_ngram, self.heads = cfg.engram_max_ngram, cfg.engram_heads_per_order
        self.sizes = table_sizes(cfg)
        self.mults = {i: multipliers(cfg, i) for i in self.layers}
        self.raw_pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        if cfg.engram_compress:
            self.register_buffer("compress_map", torch.arange(cfg.vocab_size, dtype=torch.int64))
        else:
            self.compress_map = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The identity map (no compression until `set_compression_map`)."""
        if self.compress_map is not None:
            self.compress_map.copy_(torch.arange(self.compress_map.numel(), device=self.compress_map.device))

    def compress(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return ids_BT if self.compress_map is None else self.compress_map[ids_BT]

    @property
    def pad_id(self) -> int:
        return int(self.compress_map[self.raw_pad_id]) if self.compress_map is not None else self.raw_pad_id

    def slots(self, layer: int, ids_BT: torch.Tensor, history_BTk: torch.Tensor) -> torch.Tensor:
        """[B, T, (N-1)*heads] slots of Engram layer `layer` (offsets into the packed table not added)."""
        return ngram_hashes(ids_BT, history_BTk, self.mults[layer], self.sizes[layer], self.heads)


def set_compression_map(model: nn.Module, mapping: Sequence[int] | torch.Tensor) -> None:
    """Install a tokenizer compression map (old id -> new id, from `build_compression_map`)."""
    hashing = _hashing(model)
    if hashing is None or hashing.compress_map is None:
        raise ValueError("the model has no Engram compression map; set engram_compress=true in its config")
    m = torch.as_tensor(mapping, dtype=torch.int64)
    if m.shape != hashing.compress_map.shape:
        raise ValueError(f"compression map has {m.numel()} entries, the vocabulary has "
                         f"{hashing.compress_map.numel()}")
    if m.min() < 0 or m.max() >= m.numel():
        raise ValueError("compression map values must be ids in [0, vocab_size)")
    with torch.no_grad():
        hashing.compress_map.copy_(m)


# ---- the layer module -------------------------------------------------------------------------------
class Engram(nn.Module):
    """One Engram insertion: tables + fusion. Input streams X [B,T,M,D] and rows e [B,T,d_mem];
    returns Y [B,T,M,D] to add to X."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, M = cfg.hidden_size, cfg.hc_mult or 1
        self.layer_idx, self.D, self.M = layer_idx, D, M
        self.kernel, self.dilation = cfg.engram_kernel_size, cfg.engram_max_ngram
        self.eps = cfg.rms_norm_eps
        sizes = table_sizes(cfg)[layer_idx]
        self.width = cfg.engram_dim_per_order // cfg.engram_heads_per_order
        self.d_mem = len(sizes) * self.width
        self.offsets = [sum(sizes[:h]) for h in range(len(sizes))]  # each head's first row in `table`
        self.table = nn.Embedding(sum(sizes), self.width)  # all heads' tables, packed
        self.value_proj = nn.Linear(self.d_mem, D)
        self.key_proj = nn.Linear(self.d_mem, M * D)  # M per-stream key projections, stacked
        self.key_norm = nn.Parameter(torch.ones(M, D))
        self.query_norm = nn.Parameter(torch.ones(M, D))
        self.conv_norm = nn.Parameter(torch.ones(M, D))
        self.conv = nn.Parameter(torch.zeros(M * D, self.kernel))  # depthwise, tap i sees t-(K-1-i)*dil
        self.gate_scale = 1.0  # runtime knob: 0 switches the memory off exactly (knock-out studies)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Norm weights 1, conv 0 (the linears and the table get the model's normal init)."""
        for p in (self.key_norm, self.query_norm, self.conv_norm):
            p.fill_(1.0)
        self.conv.zero_()

    # -- lookups, on the table's device --
    def lookup(self, slots_BTH: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Gather rows on the table's device and move them: e [B, T, d_mem] on (device, dtype)."""
        w = self.table.weight
        idx = slots_BTH.to(w.device) + torch.tensor(self.offsets, dtype=torch.int64, device=w.device)
        rows = F.embedding(idx, w).flatten(-2)
        device = torch.device(device)
        if rows.device.type == "cpu" and device.type == "cuda" and not rows.requires_grad:
            rows = rows.pin_memory()  # page-locked staging so the copy below is asynchronous
        return rows.to(device=device, dtype=dtype, non_blocking=True)

    # -- fusion --
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def gates(self, X_BTMD: torch.Tensor, e_BTd: torch.Tensor) -> torch.Tensor:
        """alpha [B, T, M] (times gate_scale)."""
        B, T = e_BTd.shape[:2]
        k = self.key_proj(e_BTd).view(B, T, self.M, self.D)
        g = (self._rms(k, self.key_norm) * self._rms(X_BTMD, self.query_norm)).sum(-1) / math.sqrt(self.D)
        g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
        return torch.sigmoid(g) * self.gate_scale

    def _conv_input(self, alpha_BTM: torch.Tensor, v_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gated values V [B,T,M,D], the conv's normalized input [B,T,M,D])."""
        V = alpha_BTM[..., None].to(v_BTD.dtype) * v_BTD[:, :, None, :]
        return V, self._rms(V, self.conv_norm)

    def forward(self, X_BTMD: torch.Tensor, e_BTd: torch.Tensor, positions_BT: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """Y [B, T, M, D]. With a cache (a LayerCache with engram_rows/engram_gate), e and alpha are written
        at `positions_BT` and the conv's history taps are read back from it."""
        B, T = e_BTd.shape[:2]
        alpha = self.gates(X_BTMD, e_BTd)
        V, u = self._conv_input(alpha, self.value_proj(e_BTd))
        K, dil = self.kernel, self.dilation
        if cache is None:
            x = u.reshape(B, T, self.M * self.D).transpose(1, 2)  # [B, MD, T]
            y = F.conv1d(F.pad(x, ((K - 1) * dil, 0)), self.conv[:, None, :].to(x.dtype), dilation=dil,
                         groups=self.M * self.D)
            conv = y.transpose(1, 2).reshape(B, T, self.M, self.D)
        else:
            rows = torch.arange(B, device=e_BTd.device)[:, None]
            cache.engram_rows[rows, positions_BT] = e_BTd.detach().to(cache.engram_rows.dtype)
            cache.engram_gate[rows, positions_BT] = alpha.detach().to(cache.engram_gate.dtype)
            conv = torch.zeros_like(u)
            for i in range(K):
                off = (K - 1 - i) * dil
                if off == 0:
                    u_i = u
                else:
                    p = positions_BT - off
                    valid = (p >= 0)[..., None, None]
                    p = p.clamp_min(0)
                    e_h = cache.engram_rows[rows, p].to(e_BTd.dtype)
                    a_h = cache.engram_gate[rows, p].to(alpha.dtype)
                    u_i = self._conv_input(a_h, self.value_proj(e_h))[1] * valid
                conv = conv + u_i * self.conv[:, i].view(self.M, self.D).to(u.dtype)
        return V + F.silu(conv)


# ---- model-level plumbing ---------------------------------------------------------------------------
def _hashing(model: nn.Module) -> EngramHashing | None:
    for m in model.modules():
        if isinstance(m, EngramHashing):
            return m
    return None


def engram_modules(model: nn.Module) -> list[Engram]:
    return [m for m in model.modules() if isinstance(m, Engram)]


def prefetch_rows(hashing: EngramHashing, layers: Sequence[nn.Module], input_ids_BT: torch.Tensor,
                  positions_BT: torch.Tensor, cache=None, device=None, dtype=None) -> dict[int, torch.Tensor]:
    """Rows e [B, T, d_mem] of every Engram layer for this forward, keyed by layer index.

    Hashes come from the ids (and, with a cache, the ids stored at earlier positions); rows are
    gathered wherever each table lives and moved to (device, dtype) before any block runs, so a
    host-memory table's copy overlaps nothing it must wait for. Without a cache the chunk is the
    start of its sequences (ids before it are the pad id)."""
    out: dict[int, torch.Tensor] = {}
    if not hashing.layers:
        return out
    ids = hashing.compress(input_ids_BT)
    B, T = ids.shape
    N = hashing.max_ngram
    pad = hashing.pad_id
    for layer in hashing.layers:
        if cache is not None:
            lc = cache[layer]
            if lc.engram_ids is None:
                raise ValueError(f"layer {layer} is an Engram layer but its cache has no Engram state; "
                                 f"build caches with LayerCache.allocate / allocate_cache")
            rows = torch.arange(B, device=ids.device)[:, None]
            lc.engram_ids[rows, positions_BT] = ids
            hist = []
            for k in range(1, N):
                p = positions_BT - k
                h = lc.engram_ids[rows, p.clamp_min(0)]
                hist.append(torch.where(p >= 0, h, torch.full_like(h, pad)))
        else:
            hist = [F.pad(ids, (k, 0), value=pad)[:, :T] for k in range(1, N)]
        slots = hashing.slots(layer, ids, torch.stack(hist, dim=-1))
        engram = layers[layer].engram
        out[layer] = engram.lookup(slots, device or engram.value_proj.weight.device,
                                   dtype or engram.value_proj.weight.dtype)
    return out


def place_tables(model: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None,
                 pin_memory: bool = True) -> None:
    """Keep the Engram tables on `device` (e.g. "cpu" for a CUDA model) in `dtype` (default: unchanged).

    Call after `model.to(...)` (which moves every parameter) and before building the optimizer. The
    tables are pinned when they go to host memory and CUDA is available (async H2D row copies)."""
    for m in engram_modules(model):
        w = m.table.weight.data.to(device=device, dtype=dtype or m.table.weight.dtype)
        if pin_memory and w.device.type == "cpu" and torch.cuda.is_available():
            w = w.pin_memory()
        m.table.weight.data = w


def set_gate_scale(model: nn.Module, scale: float) -> None:
    """Multiply every Engram gate by `scale`; 0 removes Engram's contribution exactly."""
    for m in engram_modules(model):
        m.gate_scale = float(scale)


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tables (the paper trains them with Adam at 5x the base lr and no weight decay)."""
    return [m.table.weight for m in engram_modules(model)]


# ---- accounting hooks (pure functions of the config) -------------------------------------------------
def engram_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters Engram adds. Keys: tables (all layers' table rows x width; counted in total, not in
    active), dense (projections, norms, conv: every token uses them), total, active (= dense),
    rows_read_per_token (table elements one token gathers, all layers)."""
    if cfg.engram_layers is None:
        return {"tables": 0, "dense": 0, "total": 0, "active": 0, "rows_read_per_token": 0}
    D, M, K = cfg.hidden_size, cfg.hc_mult or 1, cfg.engram_kernel_size
    width = cfg.engram_dim_per_order // cfg.engram_heads_per_order
    d_mem = (cfg.engram_max_ngram - 1) * cfg.engram_dim_per_order
    tables = sum(sum(s) for s in table_sizes(cfg).values()) * width
    per_layer = (d_mem * D + D) + (d_mem * M * D + M * D) + 3 * M * D + M * D * K
    dense = per_layer * len(cfg.engram_layers)
    return {"tables": tables, "dense": dense, "total": tables + dense, "active": dense,
            "rows_read_per_token": d_mem * len(cfg.engram_layers)}


def engram_flops_per_token(cfg: ModelConfig) -> int:
    """Matmul FLOPs per token (2 per multiply-add): W_V and the M W_K per Engram layer. The gate dots,
    norms and the depthwise conv (O(M*D*kernel) elementwise) are not counted, as accounting counts
    matrix multiplies only. Decode with a cache recomputes W_V for the kernel-1 history taps: add
    2 * d_mem * D * (kernel - 1) per layer on that path."""
    if cfg.engram_layers is None:
        return 0
    D, M = cfg.hidden_size, cfg.hc_mult or 1
    d_mem = (cfg.engram_max_ngram - 1) * cfg.engram_dim_per_order
    return 2 * d_mem * D * (1 + M) * len(cfg.engram_layers)


def engram_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: float = 2) -> int:
    """Decode-state bytes per token: per Engram layer an int64 id, the row e_t (d_mem) and alpha (M)."""
    if cfg.engram_layers is None:
        return 0
    d_mem = (cfg.engram_max_ngram - 1) * cfg.engram_dim_per_order
    M = cfg.hc_mult or 1
    return int(len(cfg.engram_layers) * (8 + (d_mem + M) * dtype_bytes))
