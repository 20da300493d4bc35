"""compressed-tensors INT4 / INT8 checkpoints, the format of Kimi-K2-Thinking's native INT4 release.

On disk a quantized linear layer `M` stores, instead of `M.weight` [N, K] (format "pack-quantized"):
  M.weight_packed  int32 [N, ceil(K*b/32)]: the b-bit values q (b = 4: -8..7, b = 8: -128..127) stored
                   offset-binary (q + 2^(b-1)), 32/b per word, value k at bits b*(k % (32/b)) of word
                   k // (32/b), lowest bits first
  M.weight_scale   float [N, K/G] (strategy "group", group_size G), [N, 1] ("channel") or [1] ("tensor")
  M.weight_shape   int [2] = (N, K)
and W = q * scale. Format "int-quantized" stores `M.weight` as int8 with the same scales. config.json's
`quantization_config` (quant_method "compressed-tensors") has `config_groups`, each with `targets` and the
`weights` arguments (num_bits, type "int", symmetric, strategy, group_size), and an `ignore` list. A target
or ignore entry is a module name, "re:<regex>" (re.match on the name) or a class name ("Linear": every
linear layer); a module is quantized by the first group that targets it unless `ignore` names it.

Little-endian int32 words of 4-bit values are, byte for byte, moonlet's canonical int4 (nibble q + 8,
column 2j low, 2j+1 high: moonlet.model.quant), and of 8-bit values its int8 with the top bit flipped,
so conversion both ways is a reinterpretation (arithmetic only when K does not fill the last word).

`PackedSource` reads such a checkpoint: every quantized `M.weight` reads as a float tensor (dequantized,
like FP8 in store.Dequantized), and `parts(name)` gives its stored ints and scales, from which
`quant_module` builds moonlet's QuantLinear / QuantExperts directly (interop.hf, keep_quantized).
Writing (interop.hf.save_pretrained of a quantized model): `packed_items` and `export_config`.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model.moe import Experts
from ..model.quant import (SCALE_DTYPE, QuantWeight, pack_int4, quant_experts, quant_linear, quant_weight,
                           unpack_int4)
from .layout import Entry
from .store import CheckpointError, Index, TensorSource

QUANT_METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "int-quantized")
STRATEGIES = ("group", "channel", "tensor")
# module tensors the format adds next to (or instead of) `weight`
_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


@dataclass(frozen=True)
class IntScheme:
    """How one config group stores its weights."""

    num_bits: int  # 4 or 8
    strategy: str  # "group" | "channel" | "tensor"
    group_size: int | None  # for "group"
    format: str  # "pack-quantized" | "int-quantized"

    def weights_args(self) -> dict[str, Any]:
        """The `weights` object of a config group (QuantizationArgs' fields)."""
        return {"num_bits": self.num_bits, "type": "int", "symmetric": True, "strategy": self.strategy,
                "group_size": self.group_size, "dynamic": False, "actorder": None, "block_structure": None,
                "observer": "minmax", "observer_kwargs": {}}


@dataclass
class CompressedConfig:
    groups: list[tuple[str, list[str], IntScheme]]  # (group name, targets, scheme)
    ignore: list[str]

    def scheme_for(self, module: str) -> IntScheme | None:
        """The scheme of the module with this (checkpoint) name, None if it stays in float."""
        if _matches(module, self.ignore):
            return None
        return next((s for _, targets, s in self.groups if _matches(module, targets)), None)


def _matches(module: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif p == module or p == "Linear":  # only linear layers carry quantized weights
            return True
    return False


def is_compressed(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def parse_config(qc: dict[str, Any]) -> CompressedConfig:
    """A compressed-tensors quantization_config -> CompressedConfig; ValueError for what moonlet cannot read."""
    where = "quantization_config"
    top_format = qc.get("format")  # the library's default, "fakequant", stores float weights
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where}.quantization_status {status!r} is not supported (only 'compressed' weights)")
    if qc.get("kv_cache_scheme"):
        raise ValueError(f"{where}.kv_cache_scheme is set; moonlet does not quantize the KV cache")
    sparsity = qc.get("sparsity_config")
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise ValueError(f"{where}.sparsity_config (format {sparsity.get('format')!r}) is not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}.config_groups must be a non-empty object")
    out = []
    for name, g in groups.items():
        at = f"{where}.config_groups.{name}"
        if not isinstance(g, dict):
            raise ValueError(f"{at}: preset schemes (a list of targets) are not supported; spell out `weights`")
        targets = g.get("targets")
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            raise ValueError(f"{at}.targets must be a non-empty list of strings, got {targets!r}")
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                raise ValueError(f"{at}.{act} is set: activation quantization is not supported "
                                 f"(moonlet reads weight-only int4 / int8)")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise ValueError(f"{at}.weights must be an object, got {w!r}")
        fmt = g.get("format") or top_format
        if fmt == "mixed-precision" or fmt not in FORMATS:
            raise ValueError(f"{at}: format {fmt!r} is not supported; moonlet reads {', '.join(FORMATS)}")
        if w.get("type", "int") != "int":
            raise ValueError(f"{at}.weights.type {w.get('type')!r} is not supported (only 'int')")
        if not w.get("symmetric", True):
            raise ValueError(f"{at}.weights: asymmetric quantization (symmetric: false, with a zero point) is "
                             f"not supported; moonlet reads symmetric int4 / int8")
        bits = w.get("num_bits", 8)
        if bits not in ((4, 8) if fmt == "pack-quantized" else (8,)):
            raise ValueError(f"{at}.weights.num_bits {bits!r} is not supported in {fmt} (moonlet reads "
                             f"{'4 and 8' if fmt == 'pack-quantized' else '8'})")
        gs = w.get("group_size")
        strategy = w.get("strategy") or ("group" if gs and gs > 0 else "channel" if gs == -1 else "tensor")
        if strategy not in STRATEGIES:
            raise ValueError(f"{at}.weights.strategy {strategy!r} is not supported ({', '.join(STRATEGIES)})")
        if strategy == "group" and not (isinstance(gs, int) and gs > 0):
            raise ValueError(f"{at}.weights: strategy 'group' needs a positive group_size, got {gs!r}")
        if w.get("actorder") == "group":
            raise ValueError(f"{at}.weights.actorder 'group' (a permuted weight_g_idx) is not supported")
        out.append((name, list(targets), IntScheme(bits, strategy, gs if strategy == "group" else None, fmt)))
    ignore = qc.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(t, str) for t in ignore)):
        raise ValueError(f"{where}.ignore must be a list of strings, got {ignore!r}")
    return CompressedConfig(out, list(ignore))


def quantization_config(groups: list[tuple[list[str], IntScheme]], ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config for weights written with `to_packed`."""
    return {"quant_method": QUANT_METHOD, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": {"targets": t, "weights": s.weights_args(), "input_activations": None,
                                             "output_activations": None} for i, (t, s) in enumerate(groups)},
            "ignore": ignore, "kv_cache_scheme": None}


# ---- ints: the format's <-> moonlet's -------------------------------------------------------------------
def unpack(packed: torch.Tensor, num_bits: int, K: int) -> torch.Tensor:
    """int32 [..., W] -> the signed values int8 [..., K] (reference arithmetic for any K)."""
    per = 32 // num_bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * num_bits
    v = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return (v.flatten(-2)[..., :K] - (1 << (num_bits - 1))).to(torch.int8)


def pack(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed values int8 [..., K] -> int32 [..., ceil(K*b/32)] (the inverse of unpack; pad bits are 0)."""
    per = 32 // num_bits
    K = q.shape[-1]
    u = q.to(torch.int64) + (1 << (num_bits - 1))
    u = torch.nn.functional.pad(u, (0, -K % per)).unflatten(-1, (-1, per))
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * num_bits
    words = (u << shifts).sum(-1)  # disjoint bit fields, < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _bytes_are_values(num_bits: int, K: int) -> bool:
    return sys.byteorder == "little" and K % (32 // num_bits) == 0


def to_moonlet(packed: torch.Tensor, num_bits: int, K: int) -> torch.Tensor:
    """weight_packed int32 [..., W] -> moonlet's canonical ints: int8 [..., K] (8 bits) or uint8 [..., K/2] (4)."""
    if _bytes_are_values(num_bits, K):
        u = packed.contiguous().view(torch.uint8)
        return u.clone() if num_bits == 4 else (u ^ 0x80).view(torch.int8)
    q = unpack(packed, num_bits, K)
    return pack_int4(q) if num_bits == 4 else q


def to_packed(q: torch.Tensor, scheme: str) -> torch.Tensor:
    """moonlet's canonical ints (quant.QuantWeight.parts) -> weight_packed int32."""
    bits = 4 if scheme == "int4" else 8
    K = q.shape[-1] * (2 if bits == 4 else 1)
    if _bytes_are_values(bits, K):
        u = q.contiguous() if bits == 4 else q.contiguous().view(torch.uint8) ^ 0x80
        return u.view(torch.int32).clone()
    return pack(unpack_int4(q) if bits == 4 else q, bits)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 values [N, K] * scale ([N, K/G], [N, 1] or [1]) -> [N, K] in dtype (exact in float32, one rounding)."""
    N, K = q.shape
    s = scale.float()
    s = (s.reshape(1, 1) if s.numel() == 1 else s.reshape(N, -1)).expand(N, -1)
    return (q.float().unflatten(-1, (s.shape[1], -1)) * s[..., None]).flatten(-2).to(dtype)


# ---- reading ---------------------------------------------------------------------------------------------
class PackedSource:
    """A TensorSource over a compressed-tensors checkpoint: `M.weight` of every quantized module reads as a
    float tensor (the scales' dtype unless asked), `parts` gives the stored ints. Validates names, dtypes and
    shapes of every quantized module from the headers (and the tiny `weight_shape` tensors)."""

    def __init__(self, inner: TensorSource, cfg: CompressedConfig):
        self.inner, self.cfg = inner, cfg
        keys = inner.keys()
        key_set = set(keys)
        self.schemes: dict[str, IntScheme] = {}  # "M.weight" -> scheme
        self._shapes: dict[str, tuple[int, int]] = {}
        for k in keys:
            mod, _, leaf = k.rpartition(".")
            if leaf not in _PARAMS and not (leaf == "weight" and inner.dtype(k) == torch.int8):
                continue
            if leaf == "weight_zero_point":
                raise CheckpointError(f"{k}: asymmetric quantization (a zero point) is not supported")
            if leaf == "weight_g_idx":
                raise CheckpointError(f"{k}: activation-ordered groups (a g_idx permutation) are not supported")
            if leaf in ("weight_scale", "weight_shape"):
                if f"{mod}.weight_packed" not in key_set and f"{mod}.weight" not in key_set:
                    raise CheckpointError(f"{k} has no {mod}.weight_packed (or int8 {mod}.weight) to go with it")
                continue
            scheme = cfg.scheme_for(mod)
            if scheme is None:
                raise CheckpointError(f"{k} is quantized, but quantization_config's targets / ignore leave module "
                                      f"{mod} in float")
            want = "pack-quantized" if leaf == "weight_packed" else "int-quantized"
            if scheme.format != want:
                raise CheckpointError(f"{k}: module {mod} is stored {want}, but its config group says {scheme.format}")
            for need in ("weight_scale",) + (("weight_shape",) if leaf == "weight_packed" else ()):
                if f"{mod}.{need}" not in key_set:
                    raise CheckpointError(f"missing tensor {mod}.{need} for the quantized {k}")
            self.schemes[f"{mod}.weight"] = scheme
        self._keys = [k for k in keys if k.rpartition(".")[2] not in _PARAMS] + [
            k for k in self.schemes if k not in key_set]

    @property
    def quantized(self) -> bool:
        return bool(self.schemes)

    def keys(self) -> list[str]:
        return self._keys

    def is_packed(self, name: str) -> bool:
        return name in self.schemes

    def _stored(self, name: str, suffix: str) -> str:
        return name[: -len("weight")] + suffix

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.schemes:
            return self.inner.shape(name)
        if name not in self._shapes:
            self._shapes[name] = self._check(name)
        return self._shapes[name]

    def _check(self, name: str) -> tuple[int, int]:
        """(N, K) of a quantized weight, after checking its tensors' dtypes and shapes against each other."""
        s = self.schemes[name]
        if s.format == "pack-quantized":
            shp = self.inner.get(self._stored(name, "weight_shape"))
            if shp.dim() != 1 or shp.numel() != 2 or shp.is_floating_point() or bool((shp <= 0).any()):
                raise CheckpointError(f"{self._stored(name, 'weight_shape')} must hold two positive integers "
                                      f"(rows, cols) of a 2-D weight, got {shp.tolist()}")
            N, K = (int(v) for v in shp)
            pk = self._stored(name, "weight_packed")
            want = (N, math.ceil(K * s.num_bits / 32))
            if self.inner.dtype(pk) != torch.int32 or self.inner.shape(pk) != want:
                raise CheckpointError(f"{pk} is {self.inner.dtype(pk)} {self.inner.shape(pk)}, expected int32 {want} "
                                      f"for a {s.num_bits}-bit weight of shape {(N, K)} (weight_shape)")
        else:
            shape = self.inner.shape(name)
            if len(shape) != 2:
                raise CheckpointError(f"{name}: int8 weight must be 2-D, got shape {shape}")
            N, K = shape
        sc = self._stored(name, "weight_scale")
        if s.strategy == "group":
            if K % s.group_size:
                raise CheckpointError(f"{name}: {K} columns do not split into groups of {s.group_size}")
            want_s = [(N, K // s.group_size)]
        else:
            want_s = [(N, 1), (N,)] if s.strategy == "channel" else [(1,), (1, 1), ()]
        if self.inner.shape(sc) not in want_s or not self.inner.dtype(sc).is_floating_point:
            raise CheckpointError(f"{sc} is {self.inner.dtype(sc)} {self.inner.shape(sc)}, expected a float tensor of "
                                  f"shape {want_s[0]} ({s.strategy} strategy, weight {(N, K)})")
        return N, K

    def dtype(self, name: str) -> torch.dtype:
        if name not in self.schemes:
            return self.inner.dtype(name)
        return self.inner.dtype(self._stored(name, "weight_scale"))

    def values(self, name: str) -> torch.Tensor:
        """The stored signed values int8 [N, K] of a quantized weight."""
        N, K = self.shape(name)
        s = self.schemes[name]
        if s.format == "int-quantized":
            return self.inner.get(name)
        packed = self.inner.get(self._stored(name, "weight_packed"))
        if s.num_bits == 4 and K % 2 == 0:  # through moonlet's byte layout: the cheap path
            return unpack_int4(to_moonlet(packed, 4, K))
        return to_moonlet(packed, 8, K) if s.num_bits == 8 else unpack(packed, 4, K)

    def parts(self, name: str) -> tuple[IntScheme, torch.Tensor, torch.Tensor]:
        """(scheme, moonlet's canonical ints (int8 [N, K] or packed uint8 [N, K/2]), stored scale)."""
        N, K = self.shape(name)
        s = self.schemes[name]
        if s.format == "int-quantized":
            q = self.inner.get(name)
        else:
            q = to_moonlet(self.inner.get(self._stored(name, "weight_packed")), s.num_bits, K)
        return s, q, self.inner.get(self._stored(name, "weight_scale"))

    def get(self, name: str, index: Index = (), dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.schemes:
            return self.inner.get(name, index, dtype)
        scale = self.inner.get(self._stored(name, "weight_scale"))
        w = dequantize(self.values(name), scale, dtype or scale.dtype)
        return w[index] if index else w

    def close(self) -> None:
        self.inner.close()


# ---- into moonlet's quantized modules (load with keep_quantized) ----------------------------------------------
def moonlet_scheme(s: IntScheme | None, K: int) -> tuple[str, int] | None:
    """The (moonlet scheme, group size) that holds a stored weight with K columns exactly, or None."""
    if s is None:
        return None
    if s.num_bits == 8:  # moonlet's int8 has one scale per row
        return ("int8", K) if s.strategy != "group" or s.group_size == K else None
    G = s.group_size if s.strategy == "group" else K
    return ("int4", G) if G % 2 == 0 and K % G == 0 else None


def keepable_modules(ckpt, model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, list[Entry]]]:
    """The model's Linear / Experts modules whose weights the checkpoint (interop.hf.Checkpoint) stores in a
    form moonlet.model.quant runs as is -> (the meta module, its entries). Others (e.g. int8 in groups, or
    only some experts quantized) are left to be dequantized, with a warning."""
    src = ckpt.source
    if not isinstance(src, PackedSource) or not src.quantized:
        return {}
    by_module: dict[str, list[Entry]] = {}
    for e in ckpt.entries:
        if not e.copy:
            by_module.setdefault(e.moonlet_name.rpartition(".")[0], []).append(e)
    kept, refused = {}, []
    for name, entries in by_module.items():
        mod = model.get_submodule(name)
        if isinstance(mod, Experts):
            weights = entries
        elif isinstance(mod, torch.nn.Linear):
            weights = [e for e in entries if e.moonlet_name.endswith(".weight")]
        else:
            continue
        stored = [ckpt.locations[e.hf_name][0] for e in weights]
        if not any(src.is_packed(n) for n in stored):
            continue
        schemes: dict[str, set] = {}  # moonlet tensor -> the moonlet schemes of its stored matrices
        for e, n in zip(weights, stored):
            schemes.setdefault(e.moonlet_name, set()).add(moonlet_scheme(src.schemes.get(n), src.shape(n)[-1]))
        if all(len(v) == 1 and None not in v for v in schemes.values()):
            kept[name] = (mod, entries)
        else:
            refused.append(name)
    if refused:
        warnings.warn(f"{len(refused)} quantized module(s), e.g. {refused[0]}, are stored in a form moonlet's int4 / "
                      f"int8 modules do not run as is (int8 in groups, an odd group size, or mixed within one "
                      f"module); they are dequantized", stacklevel=4)
    return kept


def _moonlet_scale(scale: torch.Tensor, N: int, scheme: str, name: str) -> torch.Tensor:
    """A stored scale ([N, K/G], [N, 1] or [1]) -> moonlet's bf16 layout (int8 [N], int4 [N, K/G])."""
    s = (scale.reshape(1, 1) if scale.numel() == 1 else scale.reshape(N, -1)).expand(N, -1)
    s = s[:, 0] if scheme == "int8" else s
    out = s.to(SCALE_DTYPE).contiguous()
    if not torch.equal(out.to(scale.dtype), s):
        warnings.warn(f"{name}: {scale.dtype} scales rounded to bfloat16 to keep the weight quantized "
                      f"(load without keep_quantized for the exact dequantized values)", stacklevel=5)
    return out


def quant_module(ckpt, meta_mod: torch.nn.Module, entries: list[Entry], device: torch.device) -> torch.nn.Module:
    """A QuantLinear / QuantExperts from the checkpoint's ints and scales (the float weight never exists)."""
    src: PackedSource = ckpt.source

    def parts(e: Entry) -> tuple[str, int, torch.Tensor, torch.Tensor]:
        name = ckpt.locations[e.hf_name][0]
        s, q, scale = src.parts(name)
        scheme, G = moonlet_scheme(s, src.shape(name)[-1])
        return scheme, G, q.to(device), _moonlet_scale(scale, q.shape[0], scheme, name).to(device)

    if isinstance(meta_mod, torch.nn.Linear):
        scheme, G, q, scale = parts(next(e for e in entries if e.moonlet_name.endswith(".weight")))
        bias = next((ckpt.read(e).to(device) for e in entries if e.moonlet_name.endswith(".bias")), None)
        return quant_linear(q, scale, scheme, G, meta_mod.weight.dtype, bias)
    stacks = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        got = [parts(e) for e in sorted((e for e in entries if e.moonlet_name.endswith("." + proj)),
                                        key=lambda e: e.expert)]
        scheme, G = got[0][:2]
        stacks[proj] = quant_weight(torch.stack([g[2] for g in got]), torch.stack([g[3] for g in got]), scheme, G,
                                    getattr(meta_mod, proj).dtype)
    return quant_experts(stacks["gate_proj"], stacks["up_proj"], stacks["down_proj"])


# ---- from moonlet's quantized modules (save_pretrained) -------------------------------------------------------
def _scheme_of(w: QuantWeight) -> IntScheme:
    if w.scheme == "int4":
        return IntScheme(4, "group", w.group_size, "pack-quantized")
    return IntScheme(8, "channel", None, "pack-quantized")


def packed_items(e: Entry, w: QuantWeight, dtype: torch.dtype | None
                 ) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """The tensors (name, shape, dtype, fetch) that store checkpoint entry `e` of quantized weight `w`.

    Scales are float32 when the float dtype is float32 (a reader that dequantizes in the scales' dtype, as
    compressed-tensors does, then gets moonlet's exact float32 weights), else bfloat16 (K2-Thinking's)."""
    N, K = e.shape
    s = _scheme_of(w)
    base = e.hf_name.removesuffix(".weight")
    s_dtype = torch.float32 if (dtype or w.dtype) == torch.float32 else SCALE_DTYPE
    s_shape = (N, K // w.group_size) if s.num_bits == 4 else (N, 1)
    return [(base + ".weight_packed", (N, math.ceil(K * s.num_bits / 32)), torch.int32,
             lambda: to_packed(w.parts(e.expert)[0], w.scheme)),
            (base + ".weight_scale", s_shape, s_dtype, lambda: (w.scale if e.expert is None else w.scale[e.expert]).to(s_dtype).reshape(s_shape)),
            (base + ".weight_shape", (2,), torch.int64, lambda: torch.tensor([N, K], dtype=torch.int64))]


def export_config(model: torch.nn.Module, entries: list[Entry], quantized: dict[str, QuantWeight]) -> dict[str, Any]:
    """quantization_config for a model saved with `packed_items`: one scheme -> targets ["Linear"] and every
    float linear layer in `ignore` (K2-Thinking's form); several -> each group targets its modules by name
    (a regex per expert stack)."""
    groups: dict[IntScheme, list[str]] = {}
    ignore: list[str] = []
    for e in entries:
        module = e.hf_name.removesuffix(".weight")
        w = quantized.get(e.moonlet_name)
        if w is None:
            if e.moonlet_name.endswith(".weight") and isinstance(_submodule(model, e.moonlet_name[:-7]), torch.nn.Linear):
                ignore.append(module)
            continue
        if e.expert is not None:
            stack, _, proj = module.rpartition(f".{e.expert}.")
            module = f"re:{re.escape(stack)}\\.\\d+\\.{re.escape(proj)}$"
        targets = groups.setdefault(_scheme_of(w), [])
        if module not in targets:
            targets.append(module)
    pairs = [(t, s) for s, t in groups.items()]
    if len(pairs) == 1:
        pairs = [(["Linear"], pairs[0][1])]
    return quantization_config(pairs, ignore)


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
