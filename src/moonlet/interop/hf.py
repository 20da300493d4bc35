"""Hugging Face DeepSeek-V3-format checkpoints: open, load into a model, save, convert.

A checkpoint directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), optionally FP8 weights with 128x128 block `weight_scale_inv`
(DeepSeek-V3, Kimi-K2) or compressed-tensors int4 / int8 weights (Kimi-K2-Thinking), which load
dequantized or, with `keep_quantized`, as moonlet's QuantLinear / QuantExperts from the stored ints.
`open_checkpoint` validates config and every tensor's presence and shape from the file headers
alone, before anything is allocated; loading then builds the model on the meta device, materializes
it once in the target dtype/device and copies tensor by tensor, so the peak memory is the model plus
one tensor. `convert_checkpoint` streams shard by shard and never
builds the model at all. The name mapping lives in `layout.py`, FP8 in `fp8.py`, int4 / int8 in
`compressed.py`, files in `store.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, ModelConfig, PRESETS, resolve_config
from ..model import CausalLM
from . import compressed, fp8
from .layout import IGNORABLE, MTP_COPIES, Entry, fused_source, hf_entries, layer_index, model_shapes
from .store import (CheckpointError, DictSource, Dequantized, SafetensorsDir, TensorSource, atomic_dir,
                    parse_size, write_shards)

DEFAULT_SHARD_SIZE = "5GB"
# files copied next to converted weights (tokenizers in every format DeepSeek/Kimi/moonlet ship)
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|generation_config\.json|chat_template.*|"
    r"vocab\..*|merges\.txt|.*\.tiktoken|tiktoken\.model|tokenization_.*\.py)$")
_WEIGHT_FILES = re.compile(r"^(.*\.safetensors|model\.safetensors\.index\.json|config\.json)$")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """torch dtype, None, "auto", or a name (fp32/float32, bf16/bfloat16, fp16/float16)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of fp32, bf16, fp16 (or 'auto': as stored)")
    return _DTYPES[name]


# ---- reading ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A validated checkpoint: `config` describes the weights as they will be in memory (MTP depths that
    are present, quantization dropped); `read(entry)` gives one tensor, dequantized."""

    path: Path | None
    config: ModelConfig
    source: TensorSource
    entries: list[Entry]
    locations: dict[str, tuple[str, tuple]]  # hf_name -> (source tensor, index into it)
    quantized: bool
    stored_dtype: torch.dtype  # the weights' own dtype (bfloat16 for FP8)

    def read(self, entry: Entry, dtype: torch.dtype | None = None) -> torch.Tensor:
        if entry.hf_name in self.locations:
            name, index = self.locations[entry.hf_name]
        else:  # an MTP copy the checkpoint does not store: the main tensor it duplicates
            main = next(e for e in self.entries if e.moonlet_name == entry.moonlet_name and not e.copy)
            name, index = self.locations[main.hf_name]
        return self.source.get(name, index, dtype)

    def close(self) -> None:
        self.source.close()


def open_checkpoint(path: str | os.PathLike, mtp: bool | None = None, strict: bool = True) -> Checkpoint:
    """Read config.json and the safetensors headers of a checkpoint directory and check that every
    tensor the config needs is there with its shape. Reads no weights.

    mtp: None = load the MTP depths the checkpoint holds (a checkpoint without them, e.g. one saved
    by transformers, loads without MTP and a warning); False = skip MTP; True = require them.
    strict: unexpected tensors are an error (a config that does not match its weights), else a warning.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a checkpoint directory")
    cfg = ModelConfig.load(p)
    qc = cfg.extra.get("quantization_config")
    try:
        packed = compressed.parse_config(qc) if compressed.is_compressed(qc) else None
        if packed is None:
            fp8.check_quantization_config(qc)
    except ValueError as e:
        raise ConfigError(f"{p / 'config.json'}: {e}") from None
    if packed is not None:
        source = compressed.PackedSource(SafetensorsDir(p), packed)
    else:
        source = Dequantized(SafetensorsDir(p), fp8.block_size(qc))
    return _plan(cfg, source, p, mtp, strict)


def _plan(cfg: ModelConfig, source: Dequantized | compressed.PackedSource, path: Path | None, mtp: bool | None,
          strict: bool) -> Checkpoint:
    where = f" in {path}" if path else ""
    keys = source.keys()
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    present = {i - L for i in (layer_index(k) for k in keys) if i is not None and L <= i < L + D}
    depths = 0
    if mtp is not False:
        while depths < D and depths in present:
            depths += 1
        if depths < D:
            msg = (f"config.json asks for {D} MTP depth(s) but the checkpoint{where} has no tensors for "
                   f"model.layers.{L + depths}.*")
            if mtp:
                raise CheckpointError(msg)
            if present - set(range(depths)):
                raise CheckpointError(msg + f" (while it has later ones: {sorted(L + k for k in present)})")
            warnings.warn(msg + ("; loading without MTP" if depths == 0 else f"; loading {depths} depth(s)"),
                          stacklevel=3)
    mem_cfg = cfg.replace(num_nextn_predict_layers=depths) if depths != D else cfg.replace()
    mem_cfg.extra.pop("quantization_config", None)  # weights are dequantized on read
    entries = hf_entries(mem_cfg)

    key_set = set(keys)
    locations: dict[str, tuple[str, tuple]] = {}
    for e in entries:
        if e.hf_name in key_set:
            got = source.shape(e.hf_name)
            if got != e.shape:
                raise CheckpointError(f"tensor {e.hf_name} has shape {got} in the checkpoint{where}, but "
                                      f"config.json implies {e.shape}")
            locations[e.hf_name] = (e.hf_name, ())
            continue
        if e.copy:
            continue
        fused = fused_source(e, mem_cfg)
        if fused and fused[0] in key_set:
            name, index, want = fused
            got = source.shape(name)
            if got != want:
                raise CheckpointError(f"tensor {name} has shape {got} in the checkpoint{where}, but config.json "
                                      f"implies {want}")
            locations[e.hf_name] = (name, index)
            continue
        raise CheckpointError(f"missing tensor {e.hf_name} in the checkpoint{where}")

    used = {name for name, _ in locations.values()}
    skipped_layers = range(L + depths, L + D)  # MTP depths not loaded
    unexpected = [k for k in keys if k not in used and not IGNORABLE.search(k)
                  and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
                  and layer_index(k) not in skipped_layers
                  and not (layer_index(k) in range(L, L + D) and k.split(".", 3)[3] in MTP_COPIES)]
    if unexpected:
        msg = (f"unexpected tensor {unexpected[0]} in the checkpoint{where} ({len(unexpected)} tensor(s) that "
               f"config.json does not describe; does the config match these weights?)")
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg + "; ignored", stacklevel=3)

    emb = locations["model.embed_tokens.weight"][0]
    return Checkpoint(path, mem_cfg, source, entries, locations, source.quantized, source.dtype(emb))


def read_config_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The `dtype` (transformers 5) or `torch_dtype` (hub) a config.json states, if any."""
    try:
        d = json.loads((Path(path) / "config.json").read_text())
        name = d.get("dtype") or d.get("torch_dtype")
        return _DTYPES.get(str(name).lower()) if name else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


# ---- into a model ---------------------------------------------------------------------------------------
def load_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, keep_quantized: bool = False) -> CausalLM:
    """Build the model on the meta device, materialize it once (dtype, device), copy tensor by tensor.

    The router's `e_score_correction_bias` stays float32 whatever `dtype` is (as in transformers).
    keep_quantized: int4 / int8 modules of a compressed-tensors checkpoint become QuantLinear / QuantExperts
    built from the stored ints and scales (never materialized in float); the rest loads as usual."""
    with torch.device("meta"):
        model = CausalLM(ckpt.config)
    if dtype is not None:
        model = model.to(dtype)  # free on meta: parameters are created in their final dtype
    device = torch.device(device or "cpu")
    kept = compressed.keepable_modules(ckpt, model) if keep_quantized else {}
    if device.type == "meta":
        return model.eval()
    for name in kept:  # a placeholder, so that to_empty allocates nothing for it
        model.set_submodule(name, torch.nn.Module())
    model = model.to_empty(device=device)
    model.model.rotary.reset_parameters()  # non-persistent buffer: recompute after to_empty
    if ckpt.config.tie_word_embeddings:  # to_empty gives each module its own new Parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    state = model.state_dict()
    with torch.no_grad():
        for e in ckpt.entries:
            if e.copy or (kept and e.moonlet_name not in state):  # a kept module's weight: built below
                continue
            dest = state[e.moonlet_name]
            dest = dest if e.expert is None else dest[e.expert]
            dest.copy_(ckpt.read(e, dtype=dest.dtype))
        for name, (meta_mod, entries) in kept.items():
            model.set_submodule(name, compressed.quant_module(ckpt, meta_mod, entries, device))
    return model.eval()


def from_pretrained(path_or_preset: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, seed: int = 0, mtp: bool | None = None,
                    strict: bool = True, keep_quantized: bool = False) -> CausalLM:
    """A model from a preset name (random weights from `seed`) or an HF-format checkpoint directory
    (DeepSeek-V3 / Kimi-K2 releases incl. FP8, Kimi-K2-Thinking's compressed-tensors INT4, transformers'
    save_pretrained, moonlet's own).

    dtype: None gives float32; "auto" the dtype the checkpoint states (bfloat16 for FP8); or a torch
    dtype / name ("bf16", "fp32", ...). device="meta" validates the
    checkpoint and returns a model without weights. mtp/strict: see `open_checkpoint`.
    keep_quantized: int4 / int8 weights (compressed-tensors) stay quantized (moonlet.model.quant modules
    built from the stored ints: inference only, int4 memory); by default they are dequantized to `dtype`."""
    dtype = parse_dtype(dtype)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        model = CausalLM(resolve_config(path_or_preset)).init_weights(seed=seed)
        if dtype not in (None, "auto") or device is not None:
            model = model.to(device=device, dtype=None if dtype == "auto" else dtype)
        return model.eval()
    ckpt = open_checkpoint(path_or_preset, mtp=mtp, strict=strict)
    try:
        if dtype == "auto":
            dtype = ckpt.stored_dtype if ckpt.quantized else (read_config_dtype(ckpt.path) or ckpt.stored_dtype)
        return load_checkpoint(ckpt, dtype or torch.float32, device, keep_quantized=keep_quantized)
    finally:
        ckpt.close()


# ---- in-memory state dicts ------------------------------------------------------------------------------
def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """moonlet state dict -> HF checkpoint names (per-expert views of the stacked tensors, MTP as layer L + k
    with its embedding / head copies). No tensor is copied."""
    state = model.state_dict()
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    out = {}
    for e in hf_entries(model.config, shapes):
        t = state[e.moonlet_name]
        out[e.hf_name] = t if e.expert is None else t[e.expert]
    return out


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor], strict: bool = True) -> dict[str, torch.Tensor]:
    """HF-named tensors (per-expert or transformers' fused experts, FP8 pairs allowed) -> moonlet state dict.

    MTP depths missing from `hf` are dropped, as in `open_checkpoint`."""
    ckpt = _plan(cfg, Dequantized(DictSource(hf)), None, None, strict)
    shapes = model_shapes(ckpt.config)
    out: dict[str, torch.Tensor] = {}
    for e in ckpt.entries:
        if e.copy:
            continue
        t = ckpt.read(e)
        if e.expert is None:
            out[e.moonlet_name] = t
        else:
            if e.moonlet_name not in out:
                out[e.moonlet_name] = torch.empty(shapes[e.moonlet_name][0], dtype=t.dtype, device=t.device)
            out[e.moonlet_name][e.expert] = t
    if ckpt.config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def load_into(model: CausalLM, hf: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors into an existing model; every tensor must be there with its exact shape."""
    ckpt = _plan(model.config, Dequantized(DictSource(hf)), None, True if model.config.num_nextn_predict_layers
                 else None, True)
    state = model.state_dict()
    with torch.no_grad():
        for e in ckpt.entries:
            if not e.copy:
                dest = state[e.moonlet_name] if e.expert is None else state[e.moonlet_name][e.expert]
                dest.copy_(ckpt.read(e, dtype=dest.dtype))


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (FP8 dequantized to bfloat16), read into memory."""
    src = Dequantized(SafetensorsDir(path))
    try:
        return {k: src.get(k) for k in src.keys()}
    finally:
        src.close()


# ---- writing ---------------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for a checkpoint of plain (unquantized) weights in `dtype`."""
    d = cfg.to_hf_dict()
    d.pop("quantization_config", None)
    d.pop("dtype", None)
    d.pop("torch_dtype", None)
    # transformers 5 writes `dtype`; hub-era configs (the `rope_scaling` spelling) `torch_dtype`: both read it
    d["torch_dtype" if cfg.rope_spelling == "rope_scaling" else "dtype"] = str(dtype).removeprefix("torch.")
    return d


def _out_dtype(entry: Entry, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if entry.moonlet_name.endswith("e_score_correction_bias"):
        return torch.float32  # a selection threshold: kept in float32 everywhere (transformers does too)
    if dtype is None or not stored.is_floating_point:
        return stored
    return dtype


Packed = list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]


def _write_checkpoint(tmp: Path, cfg: ModelConfig, entries: list[Entry], stored: Callable[[Entry], torch.dtype],
                      fetch: Callable[[Entry, torch.dtype], torch.Tensor], dtype: torch.dtype | None,
                      max_shard_size: int | str, progress: Callable[[int, int], None] | None = None,
                      packed: Callable[[Entry], Packed | None] = lambda e: None,
                      quantization_config: dict | None = None) -> None:
    """config.json + weights. packed(e): the tensors that store a quantized entry (compressed-tensors'
    layout, compressed.packed_items), None for a plain one; quantization_config goes into config.json."""
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    getters: dict[str, Callable[[], torch.Tensor]] = {}
    for e in entries:
        parts = packed(e)
        if parts is None:
            parts = [(e.hf_name, e.shape, _out_dtype(e, stored(e), dtype), None)]
        for name, shape, dt, get in parts:
            items.append((name, shape, dt))
            getters[name] = get or (lambda e=e, dt=dt: fetch(e, dt))
    embed = next(e for e in entries if e.hf_name == "model.embed_tokens.weight")
    d = hf_config_dict(cfg, _out_dtype(embed, stored(embed), dtype))
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    write_shards(tmp, items, lambda n: getters[n](), max_shard_size, progress)


def save_pretrained(model: CausalLM, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    max_shard_size: int | str = DEFAULT_SHARD_SIZE, mtp: bool = True,
                    for_transformers: bool = False) -> Path:
    """Write the model in HF layout (config.json + model.safetensors, or shards + index above
    `max_shard_size`), loadable by transformers' AutoModelForCausalLM with no custom code.

    Atomic: written to a temporary directory next to `path`, then renamed over it; files already in
    `path` that are not weights or config (tokenizer, trainer state, ...) are carried over.
    dtype: cast floating tensors (None keeps each tensor's dtype). mtp=False leaves MTP depths out.
    for_transformers: refuse (HFExportError, nothing written) a model transformers cannot load.
    A model quantized with moonlet.model.quant (int4 / int8) is written in compressed-tensors'
    pack-quantized format (Kimi-K2-Thinking's): the same ints and scales, reloadable exactly."""
    from ..model.quant import QuantLinear, QuantWeight

    quantized = {n + ".weight" if isinstance(m, QuantLinear) else n: m for n, m in model.named_modules()
                 if isinstance(m, QuantWeight)}  # moonlet tensor name -> its quantized weight
    if for_transformers:
        from .hf_compat import check_hf_exportable

        check_hf_exportable(model.config)
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = None
    parse_size(max_shard_size)
    cfg = model.config if mtp or not model.config.num_nextn_predict_layers else \
        model.config.replace(num_nextn_predict_layers=0)
    state = model.state_dict()
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items() if mtp or not k.startswith("mtp.")}
    entries = hf_entries(cfg, shapes) if not quantized else hf_entries(cfg)

    def fetch(e: Entry, out_dtype: torch.dtype) -> torch.Tensor:
        t = state[e.moonlet_name]
        return (t if e.expert is None else t[e.expert]).to(out_dtype)

    path = Path(path)
    with atomic_dir(path) as tmp:
        if path.is_dir():
            _carry_over(path, tmp)
        _write_checkpoint(
            tmp, cfg, entries, lambda e: state[e.moonlet_name].dtype, fetch, dtype, max_shard_size,
            packed=lambda e: (compressed.packed_items(e, quantized[e.moonlet_name], dtype)
                              if e.moonlet_name in quantized else None),
            quantization_config=compressed.export_config(model, entries, quantized) if quantized else None)
    return path


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) everything but weights and config from `old` into `new`."""
    for item in old.iterdir():
        if _WEIGHT_FILES.match(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(item, new / item.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype | None = None,
                       max_shard_size: int | str = DEFAULT_SHARD_SIZE, mtp: bool = True, overwrite: bool = False,
                       strict: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Any readable checkpoint (DeepSeek/Kimi release incl. FP8, transformers, moonlet) -> an HF-layout
    checkpoint (which is also moonlet's format), streamed shard by shard without building the model.

    dtype: None keeps the stored dtype (FP8 becomes bfloat16); mtp=False drops the MTP depths.
    Tokenizer files next to the weights are copied."""
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = None
    parse_size(max_shard_size)
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    ckpt = open_checkpoint(src, mtp=None if mtp else False, strict=strict)
    try:
        entries = hf_entries(ckpt.config)

        def stored(e: Entry) -> torch.dtype:
            loc = ckpt.locations.get(e.hf_name)
            return ckpt.source.dtype(loc[0]) if loc else ckpt.stored_dtype

        progress = (lambda i, n: log(f"wrote shard {i}/{n}")) if log else None
        with atomic_dir(dst) as tmp:
            _write_checkpoint(tmp, ckpt.config, entries, stored, ckpt.read, dtype, max_shard_size, progress)
            copy_tokenizer_files(src, tmp)
    finally:
        ckpt.close()
    return dst


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """A conversion's output directory: never the source; replaced only with overwrite."""
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source; choose another directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and TOKENIZER_FILES.match(f.name):
            shutil.copy2(f, dst / f.name)
