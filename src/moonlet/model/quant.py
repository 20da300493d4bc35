"""Weight-only INT8 / INT4 quantization for inference: Linear weights and stacked MoE expert weights.

Formats (both symmetric, no zero point; scales in bfloat16, as Kimi-K2-Thinking's INT4 checkpoint
stores them):
- int8: one scale per output row, s = max|w_row| / 127, q = round(w / s) in [-127, 127].
- int4: one scale per `group_size` consecutive input columns of a row (default 32, K2-Thinking's),
  s = max|w_group| / 7, q = round(w / s) in [-7, 7]; stored offset-binary (q + 8, a nibble 1..15),
  two per byte: column 2j in the low nibble, column 2j+1 in the high nibble.
Every element is then within s/2 of its dequantized value q * s.

Forward: the weight is dequantized to the activation dtype and fed to F.linear, except for int8 with
at most `kernel_max_rows` activation rows on CPU, where torch's fused `_weight_int8pack_mm` is used
(with bf16 activations: its fp32 form is 2-8x slower than fp32 F.linear here; the bf16 one ~2x faster
at batch 1 -- LOG 2026-12-02). torch's int4 CPU kernel wants an ISA-specific opaque layout that
cannot be dequantized back cheaply, so int4 always dequantizes (its win is memory, not speed).

`quantize_model(model, "int8" | "int4")` swaps nn.Linear -> QuantLinear and Experts -> QuantExperts
in place. Code that reads `linear.weight` keeps working (a dequantized copy); `experts.gate_proj[e]`
returns expert e's dequantized [out, in] weight, and `linear(x, w, e)` below is the fast form of
`F.linear(x, w[e])` for both plain and quantized stacks.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts

SCHEMES = ("int8", "int4")
SCALE_DTYPE = torch.bfloat16
QMAX = {"int8": 127, "int4": 7}
# lm_head: the logits take its error directly, it is tied to the embedding in some configs, and
# CausalLM.dtype reads it (measured: bench/quant.py, LOG)
DEFAULT_SKIP = ("lm_head",)


# ---- formats ---------------------------------------------------------------------------------------
def _scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """bf16 scale amax / qmax (1 for an all-zero row/group, so q = 0 there)."""
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(SCALE_DTYPE)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale bf16 [..., N]), per output row."""
    w = w.detach().float()
    s = _scale(w.abs().amax(-1), QMAX["int8"])
    q = (w / s.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed nibbles q [..., K] (values -8..7, K even) -> uint8 [..., K/2]: (q[2j]+8) | (q[2j+1]+8) << 4."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] (the inverse of pack_int4)."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2).to(torch.int8) - 8


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], scale bf16 [..., N, K/group_size])."""
    K = w.shape[-1]
    check_group_size(group_size)
    if K % group_size:
        raise ValueError(f"int4: the input dim ({K}) is not divisible by group_size ({group_size})")
    g = w.detach().float().unflatten(-1, (K // group_size, group_size))
    s = _scale(g.abs().amax(-1), QMAX["int4"])
    q = (g / s.float()[..., None]).round_().clamp_(-8, 7).flatten(-2)
    return pack_int4(q), s


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def dequantize(scheme: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q, scale) of either format -> the weight [..., N, K] in `dtype`."""
    if scheme == "int8":
        return q.to(dtype) * scale.to(dtype)[..., None]
    v = unpack_int4(q).to(dtype).unflatten(-1, (scale.shape[-1], -1))
    return (v * scale.to(dtype)[..., None]).flatten(-2)


# ---- modules ---------------------------------------------------------------------------------------
class QuantWeight(nn.Module):
    """A weight [N, K] or a stack [E, N, K] in int8 / int4 with its bf16 scales (buffers `qweight`, `scale`).

    `dtype` is the float dtype it dequantizes to (the original weight's; follows model.to(dtype)).
    """

    kernel_max_rows = 16  # int8: activation rows up to which _weight_int8pack_mm beats dequant + F.linear

    def __init__(self, w: torch.Tensor, scheme: str, group_size: int = 32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.scheme, self.group_size = scheme, group_size
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        q, s = quantize_int8(w) if scheme == "int8" else quantize_int4(w, group_size)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", s.contiguous())

    def _apply(self, fn, recurse=True):
        # dtype casts change what we dequantize to, never the stored ints or the bf16 scales
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.scale.device))
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(device=self.scale.device)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.scheme, self.qweight, self.scale, dtype or self.dtype)

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e's dequantized weight [N, K] (a stack), as `stacked_param[e]` would give."""
        return dequantize(self.scheme, self.qweight[e], self.scale[e], self.dtype)

    def linear(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x [..., K] @ W^T (W = expert e's weight for a stack) in x's dtype."""
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        K = x.shape[-1]
        rows = x.numel() // K
        if self.scheme == "int8" and x.device.type == "cpu" and rows <= self.kernel_max_rows:
            y = torch._weight_int8pack_mm(x.reshape(rows, K).to(torch.bfloat16), q, s)
            return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
        return F.linear(x, dequantize(self.scheme, q, s, x.dtype))

    def select_rows(self, index: torch.Tensor | list[int]) -> "QuantWeight":
        """A QuantWeight [len(index), K] of these output rows (exact: every scale belongs to one row)."""
        scale = self.scale[..., index] if self.scheme == "int8" else self.scale[..., index, :]
        return _from_parts(self, self.qweight[..., index, :], scale)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{list(self.shape)}, {self.scheme}{g}, dtype={self.dtype}"


class QuantLinear(QuantWeight):
    """A bias-optional Linear whose weight is quantized; `.weight` gives a dequantized copy."""

    def __init__(self, lin: nn.Linear, scheme: str, group_size: int = 32):
        super().__init__(lin.weight, scheme, group_size)
        self.out_features, self.in_features = lin.out_features, lin.in_features
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(nn.Module):
    """Experts with quantized stacks gate_proj/up_proj/down_proj (QuantWeight [E, out, in]).

    Same math as Experts (token-sorted dispatch); each expert that received tokens runs its three
    matmuls through QuantWeight.linear, so only the used experts are ever dequantized.
    """

    def __init__(self, experts: Experts, scheme: str, group_size: int = 32):
        super().__init__()
        self.n_experts = experts.n_experts
        self.gate_proj = QuantWeight(experts.gate_proj, scheme, group_size)
        self.up_proj = QuantWeight(experts.up_proj, scheme, group_size)
        self.down_proj = QuantWeight(experts.down_proj, scheme, group_size)

    @torch.compiler.disable
    def forward(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        K = indices_NK.shape[1]
        flat = indices_NK.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // K
        xs = x_ND.index_select(0, token)
        outs, start = [], 0
        for e, n in enumerate(torch.bincount(flat, minlength=self.n_experts).tolist()):
            if n:
                xe = xs[start:start + n]
                h = F.silu(self.gate_proj.linear(xe, e)) * self.up_proj.linear(xe, e)
                outs.append(self.down_proj.linear(h, e))
                start += n
        y_sorted = torch.cat(outs) * weights_NK.reshape(-1).index_select(0, order)[:, None].to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token, y_sorted)


def _from_parts(like: QuantWeight, q: torch.Tensor, s: torch.Tensor) -> QuantWeight:
    w = QuantWeight.__new__(QuantWeight)
    nn.Module.__init__(w)
    w.scheme, w.group_size, w.dtype = like.scheme, like.group_size, like.dtype
    w.shape = tuple(q.shape[:-1]) + (like.shape[-1],)
    w.register_buffer("qweight", q.contiguous())
    w.register_buffer("scale", s.contiguous())
    return w


def cat_rows(*ws: QuantWeight) -> QuantWeight:
    """Stack quantized weights along the output dim (exact), e.g. gate and up into one fused matmul."""
    if len({(w.scheme, w.group_size, w.shape[-1]) for w in ws}) != 1:
        raise ValueError("cat_rows needs weights of one scheme, group size and input dim")
    scale_dim = -1 if ws[0].scheme == "int8" else -2  # int8 scales [..., N], int4 [..., N, K/G]
    return _from_parts(ws[0], torch.cat([w.qweight for w in ws], dim=-2),
                       torch.cat([w.scale for w in ws], dim=scale_dim))


def linear(x: torch.Tensor, w, e: int | None = None) -> torch.Tensor:
    """F.linear(x, w) / F.linear(x, w[e]) for a plain weight or stack, the quantized kernel for a QuantWeight.

    The one call the inference fast path needs to run quantized experts (`linear(x, ex.gate_proj, e)`).
    """
    if isinstance(w, QuantWeight):
        return w.linear(x, e)
    return F.linear(x, w if e is None else w[e])


# ---- whole model -----------------------------------------------------------------------------------
@dataclass
class QuantReport:
    scheme: str
    group_size: int | None
    bytes_before: int  # parameters + buffers (state_dict tensors, shared storage once)
    bytes_after: int
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays in its float dtype

    def summary(self) -> str:
        g = f" (group {self.group_size})" if self.scheme == "int4" else ""
        return (f"{self.scheme}{g}: {len(self.quantized)} weights quantized, {len(self.skipped)} kept; "
                f"weights {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) for p in patterns)


def quant_targets(model: nn.Module, scheme: str, group_size: int = 32, skip=DEFAULT_SKIP
                  ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Which modules quantize_model would replace -> ({name: Linear|Experts}, {name: reason kept}).

    skip: module names or fnmatch patterns ("lm_head", "*.kv_b_proj", "mtp.*"); a pattern also
    matches any dotted suffix. Shared by quantize_model and moonlet.accounting (so both agree).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if scheme == "int4":
        check_group_size(group_size)
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if "embed" in n}
    targets, kept = {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Experts)):
            continue
        if _matches(name, skip):
            kept[name] = "skipped by request"
        elif isinstance(mod, nn.Linear) and id(mod.weight) in tied:
            kept[name] = "tied to the embedding"
        elif scheme == "int4" and any(w.shape[-1] % group_size for w in _weights(mod)):
            kept[name] = f"input dim not divisible by group_size {group_size}"
        else:
            targets[name] = mod
    return targets, kept


def _weights(mod: nn.Module) -> list[torch.Tensor]:
    return [mod.weight] if isinstance(mod, nn.Linear) else [mod.gate_proj, mod.up_proj, mod.down_proj]


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and buffers), each storage counted once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int = 32, skip=DEFAULT_SKIP) -> QuantReport:
    """Replace the model's Linear and Experts weights by `scheme` ("int8" | "int4") in place.

    Embeddings, norms and the router stay in their float dtype (not Linears: small, and routing is
    a discrete choice that rounding can flip); `skip` (default: lm_head) keeps more. Inference only.
    If the model has a cached derived form (moonlet.infer.fastpath.FastForward), call its refresh().
    """
    if any(isinstance(m, (QuantWeight, QuantExperts)) for m in model.modules()):
        raise ValueError("the model is already quantized")
    before = storage_bytes(model)
    targets, kept = quant_targets(model, scheme, group_size, skip)
    for name, mod in targets.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = QuantLinear(mod, scheme, group_size) if isinstance(mod, nn.Linear) else QuantExperts(mod, scheme, group_size)
        setattr(parent, attr, new)
    return QuantReport(scheme, group_size if scheme == "int4" else None, before, storage_bytes(model),
                       list(targets), kept)
