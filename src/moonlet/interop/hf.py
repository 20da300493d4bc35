"""Hugging Face DeepSeek-V3-format checkpoints: read, write, and map to moonlet's modules.

On disk (what transformers and DeepSeek's own tools use):
  model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight      one matrix per expert
  model.layers.{L+k}.*                                              MTP depth k (L = num_hidden_layers),
      with copies of the embedding (`embed_tokens`) and head (`shared_head.head`)
In memory, moonlet stacks each layer's experts ([E, I, D] / [E, D, I]) and keeps MTP in `mtp.{k}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig, resolve_config, PRESETS
from ..model import CausalLM

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_ONLY_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


# ---- name mapping ---------------------------------------------------------------------------------
def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """moonlet state dict -> HF names (experts split per expert, MTP as extra layers)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            name = f"model.layers.{L + int(k)}.{rest}"
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
            continue
        out[name] = t
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's layout stores the shared tensors again
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.model.embed_tokens.weight
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight
    return out


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> moonlet state dict (experts stacked, MTP layers moved to `mtp.{k}`).

    Tensors of layers past the MTP depths the config asks for are dropped (as transformers does)."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= L:
            k = int(m.group(1)) - L
            if k >= D or m.group(2) in _MTP_ONLY_COPIES:
                continue
            name = f"mtp.{k}.{m.group(2)}"
        em = _EXPERT_RE.match(name)
        if em:
            experts.setdefault((em.group(1), em.group(3)), {})[int(em.group(2))] = t
            continue
        out[name] = t
    for (prefix, proj), by_id in experts.items():
        E = cfg.n_routed_experts
        missing = sorted(set(range(E)) - set(by_id))
        if missing:
            raise CheckpointError(f"missing tensor {prefix}.{missing[0]}.{proj}.weight "
                                  f"({len(missing)} of {E} experts absent)")
        out[f"{prefix}.{proj}"] = torch.stack([by_id[e] for e in range(E)])
    if cfg.tie_word_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ---- files ----------------------------------------------------------------------------------------
def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (p / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {p}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        fp = p / f
        if not fp.exists():
            raise FileNotFoundError(f"shard {fp} listed in the index is missing")
        with safe_open(str(fp), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def save_pretrained(model: CausalLM, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    for_transformers: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` in HF layout, atomically (temp dir, then rename).

    for_transformers: refuse (HFExportError, nothing written) a model transformers cannot load."""
    if for_transformers:
        from .hf_compat import check_hf_exportable

        check_hf_exportable(model.config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        model.config.save(tmp)
        sd = to_hf_state_dict(model)
        tensors = {}
        seen: dict[int, str] = {}
        for k, t in sd.items():
            t = t.detach()
            if dtype is not None and t.is_floating_point() and not k.endswith("e_score_correction_bias"):
                t = t.to(dtype)
            tensors[k] = t.contiguous().clone() if t.data_ptr() in seen else t.contiguous()
            seen[t.data_ptr()] = k
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_into(model: CausalLM, hf: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors into the model; every parameter must be present with its exact shape."""
    sd = from_hf_state_dict(model.config, hf)
    own = model.state_dict()
    for name, t in own.items():
        if name not in sd:
            raise CheckpointError(f"missing tensor {name} in checkpoint")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(sd[name].shape)} in the checkpoint, "
                                  f"the config expects {tuple(t.shape)}")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]} in checkpoint ({len(extra)} unexpected)")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(sd[name].to(t.dtype))


def from_pretrained(path_or_preset: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, seed: int = 0) -> CausalLM:
    """A model from a preset name (random weights from `seed`) or an HF-format directory."""
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        model = CausalLM(resolve_config(path_or_preset)).init_weights(seed=seed)
    else:
        p = Path(path_or_preset)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a checkpoint directory (and not a preset: {', '.join(PRESETS)})")
        cfg = ModelConfig.load(p)
        with torch.device("meta"):
            model = CausalLM(cfg)
        model = model.to_empty(device="cpu")
        model.model.rotary.reset_parameters()  # non-persistent buffer: recompute after to_empty
        load_into(model, read_safetensors_dir(p))
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
