"""Weight-only INT8 / INT4 quantization for inference: Linear weights and stacked MoE expert weights.

Formats (both symmetric, no zero point; scales in bfloat16, as Kimi-K2-Thinking's INT4 checkpoint
stores them):
- int8: one scale per output row, s = max|w_row| / 127, q = round(w / s) in [-127, 127].
- int4: one scale per `group_size` consecutive input columns of a row (default 32, K2-Thinking's),
  s = max|w_group| / 7, q = round(w / s) in [-7, 7]; stored offset-binary (q + 8, a nibble 1..15),
  two per byte: column 2j in the low nibble, column 2j+1 in the high nibble.
Every element is then within s/2 of its dequantized value q * s.

Forward: with at most `kernel_max_rows` activation rows on CPU, torch's fused kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) with bf16 activations: at one row on par with
fp32 F.linear at `small`'s cache-resident shapes and 2-3x faster at 4096x4096, where dequantizing +
F.linear is 3-16x slower than fp32 (LOG 2026-12-02; the int8 kernel with fp32 activations is slow too). With more rows (prefill), dequantize to the activation dtype and
F.linear. On CPU an int4 weight whose row count suits the kernel (N % 16 == 0, group 32..256) is
stored directly in torch's ISA-specific packed layout (same bytes: N x K/2); the layout is probed once
per row count and checked on every weight, so it dequantizes exactly back to the format above.

`quantize_model(model, "int8" | "int4")` swaps nn.Linear -> QuantLinear and Experts -> QuantExperts
in place. Code that reads `linear.weight` keeps working (a dequantized copy); `experts.gate_proj[e]`
returns expert e's dequantized [out, in] weight, and `linear(x, w, e)` below is the fast form of
`F.linear(x, w[e])` for both plain and quantized stacks.
"""

from __future__ import annotations

import fnmatch
import functools
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


def dequantize(scheme: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               int4_values: torch.Tensor | None = None) -> torch.Tensor:
    """(q, scale) of either format -> the weight [..., N, K] in `dtype` (int4: or from its values)."""
    if scheme == "int8":
        return q.to(dtype) * scale.to(dtype)[..., None]
    v = (unpack_int4(q) if int4_values is None else int4_values).to(dtype).unflatten(-1, (scale.shape[-1], -1))
    return (v * scale.to(dtype)[..., None]).flatten(-2)


# ---- torch's CPU int4 kernel layout ---------------------------------------------------------------------
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] -> its nibbles [..., 2B] in memory order (low, high) as uint8."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


@functools.lru_cache(maxsize=None)
def _int4pack_blocks(N: int) -> tuple[list[tuple[int, int]], torch.Tensor] | None:
    """torch's CPU int4 layout for N rows, probed: blocks of rows in memory order, each storing column
    k's nb nibbles at k*nb (32 rows with AVX2, 64 with AVX512, two rows per byte; a shorter tail).
    -> ([(number of consecutive blocks, nb)], slot_of_row [N]); None if the layout is not of that form."""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu") or N % 16:
        return None
    n = torch.arange(N, dtype=torch.int32)[:, None].expand(N, 2)
    k = torch.arange(2, dtype=torch.int32)[None].expand(N, 2)
    cols = _nibbles(torch._convert_weight_to_int4pack_for_cpu(k.contiguous(), 1).flatten())
    row = torch.zeros(2 * N, dtype=torch.int64)
    for d in range((max(N - 1, 1).bit_length() + 3) // 4):
        digit = ((n >> (4 * d)) & 15).contiguous()
        row += _nibbles(torch._convert_weight_to_int4pack_for_cpu(digit, 1).flatten()).long() << (4 * d)
    blocks, pos = [], 0
    while pos < 2 * N:  # a block: its nb column-0 nibbles, then the same rows' column-1 nibbles
        ones = (cols[pos:] == 1).nonzero()
        nb = int(ones[0]) if len(ones) else 0
        same_rows = torch.equal(row[pos:pos + nb], row[pos + nb:pos + 2 * nb])
        if nb == 0 or not bool((cols[pos + nb:pos + 2 * nb] == 1).all()) or not same_rows:
            return None
        blocks.append((nb, row[pos:pos + nb].clone()))
        pos += 2 * nb
    rows = torch.cat([r for _, r in blocks])
    if not torch.equal(rows.sort().values, torch.arange(N)):
        return None
    runs: list[tuple[int, int]] = []  # consecutive blocks of one size, viewed together when decoding
    for nb, _ in blocks:
        if runs and runs[-1][1] == nb:
            runs[-1] = (runs[-1][0] + 1, nb)
        else:
            runs.append((1, nb))
    return runs, torch.empty(N, dtype=torch.int64).index_put_((rows,), torch.arange(N))


def _int4_kernel_ok(N: int, group_size: int, device: torch.device) -> bool:
    return (device.type == "cpu" and group_size in INT4_KERNEL_GROUPS and hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and _int4pack_blocks(N) is not None)


def to_int4pack(q: torch.Tensor) -> torch.Tensor:
    """Canonical packed int4 [..., N, K/2] -> torch's CPU kernel layout (same shape and bytes)."""
    v = unpack_int4(q).to(torch.int32) + 8
    flat = v.reshape(-1, *v.shape[-2:])
    return torch.stack([torch._convert_weight_to_int4pack_for_cpu(m.contiguous(), 1) for m in flat]).view(q.shape)


def int4pack_values(p: torch.Tensor) -> torch.Tensor:
    """torch's CPU kernel layout [..., N, K/2] -> the int4 values int8 [..., N, K] (-8..7)."""
    *lead, N, half = p.shape
    K = 2 * half
    stream = _nibbles(p.reshape(*lead, N * half))
    runs, slot_of_row = _int4pack_blocks(N)
    parts, pos = [], 0
    for count, nb in runs:  # each run: `count` blocks of nb rows, [block, k, slot] in memory
        seg = stream[..., pos:pos + count * K * nb].unflatten(-1, (count, K, nb))
        parts.append(seg.transpose(-1, -2).reshape(*lead, count * nb, K))
        pos += count * K * nb
    by_slot = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return by_slot.index_select(-2, slot_of_row).to(torch.int8) - 8


def from_int4pack(p: torch.Tensor) -> torch.Tensor:
    """torch's CPU kernel layout -> canonical packed int4 (the inverse of to_int4pack)."""
    return pack_int4(int4pack_values(p))


# ---- modules ---------------------------------------------------------------------------------------
def int8_kernel_mm(x_NK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale)^T through torch's fused CPU kernel: bf16 activations inside (its fastest form),
    contiguous rows (it refuses strided ones), the result in x's dtype."""
    return torch._weight_int8pack_mm(x_NK.to(torch.bfloat16).contiguous(), q_NK, scale_N).to(x_NK.dtype)


class QuantWeight(nn.Module):
    """A weight [N, K] or a stack [E, N, K] in int8 / int4 with its bf16 scales (buffers `qweight`, `scale`).

    `dtype` is the float dtype it dequantizes to (the original weight's; follows model.to(dtype)).
    """

    # activation rows up to which the fused kernels run (they beat dequantize + F.linear up to ~32-64 rows here)
    kernel_max_rows = 16

    def __init__(self, w: torch.Tensor, scheme: str, group_size: int = 32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.scheme, self.group_size = scheme, group_size
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        q, s = quantize_int8(w) if scheme == "int8" else quantize_int4(w, group_size)
        self._set(q, s, w.device)

    def _set(self, q: torch.Tensor, s: torch.Tensor, device: torch.device) -> None:
        """Store canonical (q, s); int4 goes to the CPU kernel's layout when that is available."""
        self.layout = "canonical"
        if self.scheme == "int4" and _int4_kernel_ok(q.shape[-2], self.group_size, device):
            p = to_int4pack(q)
            if torch.equal(from_int4pack(p), q):  # the probed layout inverts exactly, else stay canonical
                q, self.layout = p, "int4pack"
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", s.contiguous())

    def _canonical(self, q: torch.Tensor) -> torch.Tensor:
        return from_int4pack(q) if self.layout == "int4pack" else q

    def parts(self, e: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ints in the canonical format above, bf16 scales) of the weight, or of expert e of a stack."""
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        return self._canonical(q), s

    def _dequantize(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.layout == "int4pack":
            return dequantize("int4", q, s, dtype, int4_values=int4pack_values(q))
        return dequantize(self.scheme, q, s, dtype)

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
        return self._dequantize(self.qweight, self.scale, dtype or self.dtype)

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e's dequantized weight [N, K] (a stack), as `stacked_param[e]` would give."""
        return self._dequantize(self.qweight[e], self.scale[e], self.dtype)

    def linear(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x [..., K] @ W^T (W = expert e's weight for a stack) in x's dtype."""
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        K = x.shape[-1]
        rows = x.numel() // K
        N = q.shape[0]
        if x.device.type == "cpu" and 0 < rows <= self.kernel_max_rows:
            if self.scheme == "int8":
                return int8_kernel_mm(x.reshape(rows, K), q, s).view(*x.shape[:-1], N)
            if self.layout == "int4pack":
                xb = x.reshape(rows, K).to(torch.bfloat16).contiguous()  # the kernel refuses strided rows
                sz = torch.zeros(s.shape[1], N, 2, dtype=torch.bfloat16)  # [K/G, N, (scale, zero)]
                sz[..., 0] = s.t()
                y = torch._weight_int4pack_mm_for_cpu(xb, q, self.group_size, sz)
                return y.to(x.dtype).view(*x.shape[:-1], N)
        return F.linear(x, self._dequantize(q, s, x.dtype))

    def select_rows(self, index: torch.Tensor | list[int]) -> "QuantWeight":
        """A QuantWeight [len(index), K] of these output rows (exact: every scale belongs to one row)."""
        scale = self.scale[..., index] if self.scheme == "int8" else self.scale[..., index, :]
        return _from_parts(self, self._canonical(self.qweight)[..., index, :], scale)

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


def quant_weight(q: torch.Tensor, scale: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype,
                 cls: type = None) -> QuantWeight:
    """A QuantWeight (or `cls`, a subclass) from stored parts in the canonical format -- e.g. a checkpoint's
    ints and scales -- without a float round trip. int8: q [..., N, K], scale [..., N]; int4: q uint8
    [..., N, K/2], scale [..., N, K/group_size]."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    K = q.shape[-1] * (2 if scheme == "int4" else 1)
    want = tuple(q.shape[:-1]) if scheme == "int8" else (*q.shape[:-1], K // group_size)
    if q.dtype != (torch.int8 if scheme == "int8" else torch.uint8) or tuple(scale.shape) != want or (
            scheme == "int4" and K % group_size):
        raise ValueError(f"{scheme} parts do not fit: q {q.dtype} {tuple(q.shape)}, scale {tuple(scale.shape)} "
                         f"(group_size {group_size}, expected scale {want})")
    w = (cls or QuantWeight).__new__(cls or QuantWeight)
    nn.Module.__init__(w)
    w.scheme, w.group_size, w.dtype = scheme, group_size, dtype
    w.shape = (*q.shape[:-1], K)
    w._set(q, scale.to(SCALE_DTYPE), q.device)
    return w


def quant_linear(q: torch.Tensor, scale: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear from stored parts (see quant_weight)."""
    lin = quant_weight(q, scale, scheme, group_size, dtype, cls=QuantLinear)
    lin.out_features, lin.in_features = lin.shape
    lin.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


def quant_experts(gate_proj: QuantWeight, up_proj: QuantWeight, down_proj: QuantWeight) -> QuantExperts:
    """QuantExperts from three quantized stacks [E, out, in]."""
    ex = QuantExperts.__new__(QuantExperts)
    nn.Module.__init__(ex)
    ex.n_experts = gate_proj.shape[0]
    ex.gate_proj, ex.up_proj, ex.down_proj = gate_proj, up_proj, down_proj
    return ex


def _from_parts(like: QuantWeight, q: torch.Tensor, s: torch.Tensor) -> QuantWeight:
    return quant_weight(q, s, like.scheme, like.group_size, like.dtype)


def cat_rows(*ws: QuantWeight) -> QuantWeight:
    """Stack quantized weights along the output dim (exact), e.g. gate and up into one fused matmul."""
    if len({(w.scheme, w.group_size, w.shape[-1]) for w in ws}) != 1:
        raise ValueError("cat_rows needs weights of one scheme, group size and input dim")
    scale_dim = -1 if ws[0].scheme == "int8" else -2  # int8 scales [..., N], int4 [..., N, K/G]
    return _from_parts(ws[0], torch.cat([w._canonical(w.qweight) for w in ws], dim=-2),
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


def quant_targets(model: nn.Module, scheme: str, group_size: int = 32, skip=DEFAULT_SKIP, experts_only: bool = False
                  ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Which modules quantize_model would replace -> ({name: Linear|Experts}, {name: reason kept}).

    skip: module names or fnmatch patterns ("lm_head", "*.kv_b_proj", "mtp.*"); a pattern also
    matches any dotted suffix. experts_only: only the routed experts (Kimi-K2-Thinking's recipe:
    INT4 experts, everything else bf16). Shared by quantize_model and moonlet.accounting.
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
        elif experts_only and not isinstance(mod, Experts):
            kept[name] = "experts only"
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
def quantize_model(model: nn.Module, scheme: str, group_size: int = 32, skip=DEFAULT_SKIP,
                   experts_only: bool = False) -> QuantReport:
    """Replace the model's Linear and Experts weights by `scheme` ("int8" | "int4") in place.

    Embeddings, norms and the router stay in their float dtype (not Linears: small, and routing is
    a discrete choice that rounding can flip); `skip` (default: lm_head) keeps more, `experts_only`
    keeps everything but the routed experts. Inference only.
    If the model has a cached derived form (moonlet.infer.fastpath.FastForward), call its refresh().
    """
    if any(isinstance(m, (QuantWeight, QuantExperts)) for m in model.modules()):
        raise ValueError("the model is already quantized")
    before = storage_bytes(model)
    targets, kept = quant_targets(model, scheme, group_size, skip, experts_only)
    for name, mod in targets.items():
        new = QuantLinear(mod, scheme, group_size) if isinstance(mod, nn.Linear) else QuantExperts(mod, scheme, group_size)
        model.set_submodule(name, new)
    return QuantReport(scheme, group_size if scheme == "int4" else None, before, storage_bytes(model),
                       list(targets), kept)
