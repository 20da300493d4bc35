"""Rotary position embedding with YaRN, for the decoupled 64-dim rope part of MLA.

DeepSeek checkpoints store the rope rows of `q_b_proj` and `kv_a_proj_with_mqa` as interleaved pairs
(x0,x1),(x2,x3),...; moonlet rotates those pairs in place on the raw weights (`rope_interleave`), so
the latent cache holds k_pe in checkpoint order. The YaRN maths follows transformers' implementation
(which the parity tests pin), computed in float32 the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin amplitude (YaRN's attention_factor, 1.0 without YaRN)."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    y = cfg.yarn
    if y is None:
        return inv_freq, 1.0
    factor = y["factor"]
    attention_factor = y["attention_factor"]
    if attention_factor is None:
        if y["mscale"] and y["mscale_all_dim"]:
            attention_factor = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    low, high = yarn_correction_range(y["beta_fast"], y["beta_slow"], dim, base,
                                      y["original_max_position_embeddings"], y["truncate"])
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: divide by factor
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original_max: int,
                          truncate: bool = True) -> tuple[float, float]:
    """The dims [low, high] over which YaRN ramps from original to interpolated frequencies."""
    def corr_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def softmax_scale(cfg: ModelConfig) -> float:
    """(d_nope + d_rope)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when that is set."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.yarn
    if y is not None and y["mscale_all_dim"]:
        scale *= yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Gives (cos, sin) [B, T, R/2] for absolute positions [B, T]; shared by every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the frequencies, e.g. after building the model on the meta device."""
        inv_freq, self.attention_factor = rope_parameters(self.cfg, device=self.inv_freq.device)
        self.inv_freq = inv_freq

    def _apply(self, fn, recurse=True):
        """Keep the frequencies float32 when the model is cast: bfloat16 frequencies put the angles
        1.8 rad off at position 4096 for DeepSeek-V3's RoPE."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_BT.to(torch.float32)[..., None] * self.inv_freq.float()
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of x [B, T, (H,) R] by (cos, sin) [B, T, R/2].

    interleaved: pairs are (x[2i], x[2i+1]) and stay in place (DeepSeek's complex-number form).
    not interleaved: pairs are (x[i], x[i + R/2]) (the "rotate half" form).
    """
    if x.dim() == 4:  # per-head tensor: broadcast over heads
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        dtype = _promote(x.dtype, cos.dtype)
        cdtype = _promote(dtype, torch.float32)  # complex needs >= fp32; the real form keeps the precision
        xf, c, s = x.to(cdtype), cos.to(cdtype), sin.to(cdtype)
        if torch.compiler.is_compiling():
            # inductor generates no code for complex ops (they would run eagerly between its kernels):
            # the same four products on the (even, odd) pairs, which it fuses
            x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), -1).flatten(-2).to(dtype)
        # (x[2i] + i x[2i+1]) * (cos + i sin) as one complex multiply: the same four products (equal to
        # rounding), ~5x faster forward + backward than strided slices; the complex view needs an even
        # offset and strides
        if xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
            xf = xf.contiguous()
        xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * torch.complex(c, s)).flatten(-2).to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types for float dtypes, in plain Python (torch.compile traces it without a break)."""
    if a == b:
        return a
    return torch.float64 if max(_FLOAT_RANK[a], _FLOAT_RANK[b]) == 3 else torch.float32
