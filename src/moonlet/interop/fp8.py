"""FP8 block-scaled weights, as DeepSeek-V3 and Kimi-K2 publish them.

A quantized linear weight W [out, in] is stored as `W_q` (float8_e4m3fn, same shape) plus
`weight_scale_inv` (float32, [ceil(out/128), ceil(in/128)]): one scale per 128 x 128 block, and
    W = W_q.float() * scale_inv[row // 128, col // 128].
Edge blocks of shapes not divisible by 128 are partial blocks with their own scale (the grid is a
ceil-division), exactly as DeepSeek's `weight_dequant` kernel indexes it.
"""

from __future__ import annotations

from typing import Any

import torch

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
DEFAULT_BLOCK = (128, 128)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def block_size(quantization_config: dict[str, Any] | None) -> tuple[int, int]:
    """The (rows, cols) block of a `quantization_config` (DeepSeek writes `weight_block_size`)."""
    if not quantization_config:
        return DEFAULT_BLOCK
    bs = quantization_config.get("weight_block_size") or DEFAULT_BLOCK
    return int(bs[0]), int(bs[1])


def check_quantization_config(qc: Any) -> None:
    """Accept what moonlet can dequantize: FP8 with block scales. Anything else is a clear error."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"quantization_config.quant_method {method!r} is not supported; moonlet reads FP8 block-scaled "
            f"checkpoints (quant_method 'fp8', as DeepSeek-V3 and Kimi-K2 publish them), compressed-tensors int4 / "
            f"int8 ones ('compressed-tensors', as Kimi-K2-Thinking) and unquantized ones"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    bs = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {bs!r}")


def dequantize(w_q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
               dtype: torch.dtype = torch.bfloat16, name: str = "weight") -> torch.Tensor:
    """FP8 [out, in] + scale_inv [ceil(out/br), ceil(in/bc)] -> `dtype` [out, in].

    Works in row bands of `br` so the float32 intermediate stays one band, not the whole matrix."""
    if w_q.dim() != 2:
        raise ValueError(f"{name}: FP8 block scales need a 2-D weight, got shape {tuple(w_q.shape)}")
    rows, cols = w_q.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}, expected {grid} for a weight of shape "
            f"{(rows, cols)} in {br}x{bc} blocks"
        )
    out = torch.empty(rows, cols, dtype=dtype, device=w_q.device)
    scale = scale_inv.to(device=w_q.device, dtype=torch.float32)
    for i in range(grid[0]):
        band = w_q[i * br:(i + 1) * br].to(torch.float32)  # [<=br, cols]
        s = scale[i].repeat_interleave(bc)[:cols]  # [cols]
        out[i * br:(i + 1) * br] = (band * s).to(dtype)
    return out
