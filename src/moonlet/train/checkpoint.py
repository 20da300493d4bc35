"""Training checkpoints: atomic, keep-last-N, resumable, loadable by everything else.

    RUN_DIR/checkpoints/step_0001200/
        config.json  model.safetensors       moonlet.interop.hf.save_pretrained (HF names and layout)
        tokenizer.json  tokenizer_config.json
        trainer_state.pt                      step, optimizer, loader position, RNG, metrics state
        train_args.json                       how the run was started (resume reads it back)
        distributed/                          runs under torchrun (moonlet.dist): the sharded model and
                                              optimizer state (torch.distributed.checkpoint); the run's
                                              last checkpoint also has the consolidated model.safetensors

A checkpoint is written into `checkpoints/.tmp_step_XXXXXXX_<pid>/` and renamed into place, so a
`step_*` directory is always complete: a crash (even SIGKILL) mid-save leaves at worst a `.tmp_*`
directory (ignored, removed by the next save) and the previous checkpoints intact. Old checkpoints
beyond keep_last are renamed to `.trash_*` before deletion for the same reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..config import ConfigError, atomic_write_text
from ..interop.hf import CheckpointError, save_pretrained

STEP_RE = re.compile(r"^step_(\d+)$")
REQUIRED = ("config.json", "trainer_state.pt", "train_args.json")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


DISTRIBUTED = "distributed"


def _has_weights(d: Path) -> bool:
    return (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()


def has_distributed_state(d: str | os.PathLike) -> bool:
    """A checkpoint written by a sharded run: its weights and optimizer state are DCP shards."""
    return (Path(d) / DISTRIBUTED / ".metadata").is_file()


def is_complete(d: Path) -> bool:
    return d.is_dir() and all((d / f).exists() for f in REQUIRED) and (_has_weights(d) or has_distributed_state(d))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory -> its newest complete checkpoint; a checkpoint directory -> itself."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir() and (p / "config.json").exists():
        return p
    if p.is_dir() and p.name == "checkpoints" and not (p / "checkpoints").exists():
        p = p.parent
    if p.is_dir() and (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise FileNotFoundError(f"run directory {p} has no complete checkpoint yet")
        return ckpts[-1][1]
    raise FileNotFoundError(f"{p} is neither a checkpoint directory (no config.json) nor a run directory "
                            f"(no checkpoints/)")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, trainer_state: dict, train_args: dict,
                    tokenizer=None, keep_last: int = 3, config=None, add_files=None) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last` (0 = keep all).

    Sharded runs: model is the consolidated CausalLM or None (then only `config` is written: the
    weights are in the shards), and add_files(tmp_dir) moves the shards into the checkpoint."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if model is not None:
            save_pretrained(model, tmp)
        else:
            config.save(tmp)
        if add_files is not None:
            add_files(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _atomic_torch_save(trainer_state, tmp / "trainer_state.pt")
        atomic_write_text(tmp / "train_args.json", json.dumps(train_args, indent=2, sort_keys=True, default=str) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
            old = root / f".trash_{final.name}_{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for _, d in list_checkpoints(run_dir)[:-keep_last]:
            trash = root / f".trash_{d.name}_{os.getpid()}"
            os.replace(d, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    """trainer_state.pt of a checkpoint, with a clear error when it is missing or damaged."""
    p = Path(ckpt) / "trainer_state.pt"
    if not p.exists():
        raise CheckpointError(f"{Path(ckpt)} has no trainer_state.pt: it holds weights only (start a new run from it "
                              f"with --init instead of resuming)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {p} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})") from None


def load_model(ckpt: str | os.PathLike, dtype: torch.dtype | None = None, device=None, keep_quantized: bool = False):
    """The CausalLM of a checkpoint dir (or a run dir's newest), with a clear error when damaged.
    keep_quantized: int4 / int8 weights stay quantized (inference), see interop.hf.from_pretrained."""
    from ..interop.hf import from_pretrained

    d = resolve_checkpoint(ckpt)
    if not _has_weights(d) and has_distributed_state(d):  # a sharded run's intermediate checkpoint
        from ..dist.checkpoint import load_consolidated

        return load_consolidated(d, dtype=dtype, device=device)
    try:
        return from_pretrained(d, dtype=dtype, device=device, keep_quantized=keep_quantized)
    except (FileNotFoundError, CheckpointError, ConfigError):  # already name the file and what is wrong
        raise
    except Exception as e:  # safetensors / JSON errors on a damaged file
        raise CheckpointError(f"checkpoint {d} cannot be loaded, its weights are corrupt or truncated "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def load_train_args(ckpt: str | os.PathLike) -> dict:
    p = Path(ckpt) / "train_args.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{Path(ckpt)} has no train_args.json (not a moonlet training checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is corrupt: {e}") from None


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(root: Path) -> None:
    """Temp/trash directories left by processes that died mid-save (never our own live ones)."""
    for d in root.iterdir():
        m = re.match(r"^\.+(?:tmp|trash)_step_\d+_(\d+)", d.name)  # save_pretrained's own temp adds a "."
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
