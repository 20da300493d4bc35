"""Safetensors checkpoint directories: read tensor by tensor, write in shards, atomically.

Reading never loads a whole checkpoint: a `TensorSource` answers `keys()`, `shape(name)` and
`dtype(name)` from the file headers and reads one tensor (or one slice of it) on `get`. Sources:
  SafetensorsDir   `model.safetensors`, or the shards of `model.safetensors.index.json`
  DictSource       an in-memory state dict (e.g. a transformers model's)
  Dequantized      wraps either and turns FP8 + `*.weight_scale_inv` pairs into plain weights
  (compressed.PackedSource does the same for compressed-tensors int4 / int8 weights)
Writing (`write_shards`) plans shards from shapes alone, then materializes one shard at a time, so
converting a checkpoint holds at most one shard in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import fp8

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the file or tensor."""


Index = tuple  # a basic-indexing key for a slice read, e.g. (e,) or (e, slice(0, I))


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str, index: Index = (), dtype: torch.dtype | None = None) -> torch.Tensor: ...


# ---- sources ----------------------------------------------------------------------------------------
class SafetensorsDir:
    """The tensors of a checkpoint directory, opened lazily (headers only until a tensor is read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, str] = {}  # tensor -> file name
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must be an object")
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).is_file():
                    raise CheckpointError(f"shard {f} listed in {index} is missing from {self.path}")
            self._where = dict(weight_map)
            self._check_headers()
        else:
            files = [SINGLE_NAME] if (self.path / SINGLE_NAME).is_file() else sorted(
                f.name for f in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no weights in {self.path}: expected {SINGLE_NAME} or {INDEX_NAME} "
                                      f"with its shards")
            for f in files:
                for k in self._open(f).keys():
                    self._where[k] = f

    def _open(self, file: str):
        h = self._handles.get(file)
        if h is None:
            fp = self.path / file
            try:
                h = safe_open(str(fp), framework="pt")
            except Exception as e:  # truncated or not a safetensors file
                raise CheckpointError(f"cannot read {fp}: the file is corrupt or truncated ({e})") from None
            self._handles[file] = h
        return h

    def _check_headers(self) -> None:
        """Every tensor the index promises is in its shard (a stale index is caught before loading)."""
        by_file: dict[str, list[str]] = {}
        for k, f in self._where.items():
            by_file.setdefault(f, []).append(k)
        for f, names in by_file.items():
            have = set(self._open(f).keys())
            for k in names:
                if k not in have:
                    raise CheckpointError(f"tensor {k} is listed in {INDEX_NAME} under {f}, but {f} does not hold it")

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name} in {self.path}")
        return self._open(self._where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        s = self._slice(name).get_dtype()
        if s not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {s}, which moonlet does not read")
        return _ST_DTYPES[s]

    def get(self, name: str, index: Index = (), dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            t = self._slice(name)[index] if index else self._open(self._where[name]).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # e.g. a shard truncated after its header
            raise CheckpointError(f"cannot read tensor {name} from {self.path / self._where[name]}: the file is corrupt or truncated ({e})") from None
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


class DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t(name).dtype

    def _t(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"missing tensor {name}")
        return self.tensors[name]

    def get(self, name: str, index: Index = (), dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._t(name).detach()
        t = t[index] if index else t
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        pass


class Dequantized:
    """A source whose FP8 weights (with `*.weight_scale_inv`) read as plain `bfloat16` (or the asked dtype)."""

    def __init__(self, inner: TensorSource, block: tuple[int, int] = fp8.DEFAULT_BLOCK):
        self.inner, self.block = inner, block
        keys = inner.keys()
        key_set = set(keys)
        self.scales = {k[: -len(fp8.SCALE_SUFFIX)]: k for k in keys if k.endswith(fp8.SCALE_SUFFIX)}
        for w in self.scales:
            if w not in key_set:
                raise CheckpointError(f"{self.scales[w]} has no weight {w} to scale")
        self._keys = [k for k in keys if not k.endswith(fp8.SCALE_SUFFIX)]

    @property
    def quantized(self) -> bool:
        return bool(self.scales) or any(fp8.is_fp8(self.inner.dtype(k)) for k in self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        dt = self.inner.dtype(name)
        return torch.bfloat16 if fp8.is_fp8(dt) else dt

    def get(self, name: str, index: Index = (), dtype: torch.dtype | None = None) -> torch.Tensor:
        raw_dtype = self.inner.dtype(name)
        if name not in self.scales:
            if fp8.is_fp8(raw_dtype):
                raise CheckpointError(f"FP8 tensor {name} has no {name}{fp8.SCALE_SUFFIX} to dequantize it with")
            return self.inner.get(name, index, dtype)
        if not fp8.is_fp8(raw_dtype):
            raise CheckpointError(f"{name} has a {fp8.SCALE_SUFFIX} but dtype {raw_dtype}; expected float8_e4m3fn")
        try:
            w = fp8.dequantize(self.inner.get(name), self.inner.get(self.scales[name]), self.block,
                               dtype or torch.bfloat16, name=name)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return w[index] if index else w

    def close(self) -> None:
        self.inner.close()


# ---- writing --------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (decimal units like transformers, binary with `i`)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        n = int(float(num) * mult)
    except ValueError:
        raise ValueError(f"shard size {size!r} is not a size like 5GB, 500MB or 2GiB") from None
    if n <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return n


def plan_shards(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: start a new shard when the next tensor would overflow the current one
    (a tensor bigger than the limit gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(dir: Path, items: list[tuple[str, tuple[int, ...], torch.dtype]],
                 fetch: Callable[[str], torch.Tensor], max_shard_size: int | str,
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write `items` (name, shape, dtype) into `dir` as `model.safetensors`, or as
    `model-0000i-of-0000n.safetensors` + index when they exceed `max_shard_size`. Returns file names."""
    max_bytes = parse_size(max_shard_size)
    sizes = [(n, _nbytes(shape, dt)) for n, shape, dt in items]
    shards = plan_shards(sizes, max_bytes)
    nbytes = dict(sizes)
    files = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(zip(files, shards)):
        tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, int, int]] = set()
        for n in names:
            t = fetch(n).detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
            if key in seen:  # the same memory under two names (tied or copied tensors): store twice
                t = t.clone()
            seen.add(key)
            tensors[n] = t
            weight_map[n] = file
        save_file(tensors, str(dir / file), metadata={"format": "pt"})
        del tensors
        if progress:
            progress(i + 1, len(files))
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` (renames only),
    on failure it is removed and `path` is untouched. A symlink is followed (its target is replaced)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be readable like any dir
    try:
        yield tmp
        for f in tmp.glob("*.safetensors"):  # safetensors writes 0600 (via a temp file): make them plain files
            os.chmod(f, 0o666 & ~umask)
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
