"""Distributed checkpoints (torch.distributed.checkpoint) and consolidated HF export.

`save_distributed` writes every rank's shards of the model and optimizer state (DTensors carry
their global shape and offsets) into one directory; `load_distributed` reads it into a model
sharded any other way -- another world size, dp_shard or ep -- because DCP plans the reads from
the global layout ("resharding"). Writes go to a temp directory that rank 0 renames after every
rank has finished, so a crash never leaves a half-written checkpoint under the final name. The
directory must be on a filesystem all ranks see (as for DCP's FileSystemWriter).

`export_hf` gathers the full state dict to rank 0 (CPU) and writes a normal moonlet / Hugging Face
checkpoint directory (config.json + model.safetensors) with `moonlet.interop.hf.save_pretrained`.
`load_consolidated` does the same offline, in one process, from a training checkpoint's DCP shards
(`python -m moonlet.dist.export CKPT` writes it next to them).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..interop.hf import CheckpointError, save_pretrained
from ..model import CausalLM

_EXTRA = "extra.pt"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _state(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    if optimizers:
        model_sd, optim_sd = get_state_dict(model, tuple(optimizers))
        return {"model": model_sd, "optim": optim_sd}
    return {"model": get_model_state_dict(model)}


def save_distributed(path: str | os.PathLike, model: torch.nn.Module,
                     optimizers: Sequence[torch.optim.Optimizer] = (), extra: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Writes model (+ optimizer) shards and `extra` (small
    picklable trainer state, from rank 0) to `path`, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dcp.save(_state(model, optimizers), checkpoint_id=str(tmp))
    if _rank() == 0:
        torch.save(extra or {}, tmp / _EXTRA)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_distributed(path: str | os.PathLike, model: torch.nn.Module,
                     optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, Any]:
    """Collective: load a `save_distributed` checkpoint into `model` (and `optimizers`) as they are
    sharded now, whatever the layout at save time. Returns the saved `extra` dict."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a distributed checkpoint (no .metadata file)")
    state = _state(model, optimizers)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP wraps per-rank failures; keep the first line readable
        raise CheckpointError(f"cannot load distributed checkpoint {path} into this model: {e}") from e
    set_state_dict(model, tuple(optimizers), model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return torch.load(path / _EXTRA, weights_only=False) if (path / _EXTRA).exists() else {}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state dict, on CPU, on rank 0 only (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_one_process(state: dict, shards: Path) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(shards), no_dist=True)


def plain_model(cfg) -> CausalLM:
    """An unsharded CausalLM on CPU with uninitialised weights (they are loaded next)."""
    with torch.device("meta"):
        plain = CausalLM(cfg)
    plain = plain.to_empty(device="cpu")
    plain.model.rotary.reset_parameters()  # non-persistent buffer: recompute after to_empty
    return plain


def load_consolidated(ckpt: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> CausalLM:
    """The full model of a sharded run's checkpoint (config.json + distributed/ DCP shards), read in
    this process alone (no process group needed, any saved layout)."""
    from ..config import ModelConfig

    ckpt = Path(ckpt)
    shards = ckpt / "distributed"
    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"{ckpt} has no distributed/.metadata: not a checkpoint of a distributed run")
    model = plain_model(ModelConfig.load(ckpt))
    state = {"model": model.state_dict()}
    try:
        _load_one_process(state, shards)
    except Exception as e:
        raise CheckpointError(f"cannot read the distributed checkpoint {shards}: {str(e).splitlines()[0][:300]}") from e
    model.load_state_dict(state["model"], strict=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def load_optimizer_offline(shards: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer part of a `save_distributed` checkpoint into an unsharded model's optimizer,
    in this process alone (a sharded run resumed on one process)."""
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    try:
        _load_one_process(state, shards)
    except Exception as e:
        raise CheckpointError(f"cannot read the optimizer state in {shards}: {str(e).splitlines()[0][:300]}") from e
    set_optimizer_state_dict(model, optimizer, state["optim"])


def consolidated_model(model: CausalLM) -> CausalLM | None:
    """Collective: an unsharded CPU copy of a sharded model on rank 0 (None on the other ranks)."""
    sd = full_state_dict(model)
    if _rank() != 0:
        return None
    plain = plain_model(model.config)
    plain.load_state_dict(sd, strict=True)
    return plain


def export_hf(model: CausalLM, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Collective: write a consolidated HF-format checkpoint of a sharded model (rank 0 writes)."""
    plain = consolidated_model(model)
    if plain is not None:
        save_pretrained(plain, path, dtype=dtype)
    _barrier()
    return Path(path)
