"""Perplexity and bits per byte of a text under a causal LM, with a sliding window.

The text is tokenized once (BOS prepended when the tokenizer has one, so every text token is
scored). Windows of `window` tokens start every `stride` tokens; each window scores only the targets
the previous windows did not, so every target is scored exactly once and, after the first window,
with at least `window - stride` tokens of context. This is the loop of HF's "Perplexity of
fixed-length models" guide; the stride is capped at window - 1 so that no target is skipped.

    nll/token     = sum of -log p(target | context) / number of targets       (nats)
    perplexity    = exp(nll/token)
    bits per byte = sum of -log2 p / UTF-8 bytes of the scored text            (tokenizer-independent)

Model contract: `model(input_ids [B, T]) -> object with .logits [B, T, V]` (moonlet's CausalLM or
any HF causal LM). Tokenizer: `encode(text) -> list[int]`, `decode(ids) -> str`, optional `bos_id`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    index: int
    begin: int  # input tokens [begin, end)
    end: int
    score_from: int  # targets [score_from, end) are scored by this window

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def effective_stride(window: int, stride: int | None) -> int:
    """stride (default window // 2), at most window - 1: a window's first scored target needs one
    token of context inside the window (HF's loop silently drops that target when stride == window)."""
    stride = stride or max(1, window // 2)
    return max(1, min(stride, window - 1))


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows covering targets 1..n_tokens-1 exactly once (target t is predicted from tokens < t).
    Window k has inputs [k * stride, k * stride + window) (clipped at the end) and scores the targets
    the previous window did not; `stride` must be <= window - 1 (see effective_stride)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    if n_tokens < 2:
        raise ValueError("the text is too short: it needs at least 2 tokens (1 with a BOS token)")
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n_tokens)
        out.append(Window(len(out), begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            return out
        begin += stride


@dataclass
class PerplexityResult:
    nll_sum: float  # nats, over all scored targets
    n_tokens: int  # scored targets
    n_bytes: int  # UTF-8 bytes those targets cover
    window: int
    stride: int
    per_window: list[dict] = field(default_factory=list)  # {index, begin, end, n_scored, nll_sum}

    @property
    def nll_per_token(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.n_bytes)

    @property
    def bits_per_token(self) -> float:
        return self.nll_per_token / math.log(2)

    def summary(self) -> dict:
        return {"nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "bits_per_token": self.bits_per_token,
                "n_tokens": self.n_tokens, "n_bytes": self.n_bytes, "window": self.window, "stride": self.stride,
                "n_windows": len(self.per_window)}


def tokenize_for_ppl(text: str, tokenizer: Any) -> tuple[list[int], int]:
    """(ids, scored bytes): BOS prepended when the tokenizer has one; otherwise the first token is
    context only and its bytes are not counted."""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_id", None)
    n_bytes = len(text.encode("utf-8"))
    if bos is not None:
        return [int(bos)] + ids, n_bytes
    if not ids:
        return ids, 0
    return ids, n_bytes - len(tokenizer.decode(ids[:1]).encode("utf-8"))


@torch.inference_mode()
def window_nll(model: Callable, ids: Sequence[int], windows: Sequence[Window], batch_size: int = 4,
               device: torch.device | str | None = None) -> Iterator[tuple[Window, float]]:
    """Yield (window, summed NLL in nats of its scored targets) in order; consecutive windows of equal
    length run as one batch [B, window]."""
    device = device or _model_device(model)
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        nll: dict[int, float] = {}
        for length in dict.fromkeys(w.end - w.begin for w in chunk):
            batch = [w for w in chunk if w.end - w.begin == length]
            x_BT = torch.stack([ids_t[w.begin:w.end] for w in batch]).to(device)
            logits_BTV = model(x_BT).logits
            for row, w in enumerate(batch):
                first = w.score_from - w.begin - 1  # logits at position j predict token begin + j + 1
                lg_SV = logits_BTV[row, first:length - 1].float()
                tgt_S = x_BT[row, first + 1:length]
                nll[w.index] = float(F.cross_entropy(lg_SV, tgt_S, reduction="sum"))
        for w in chunk:
            yield w, nll[w.index]


def perplexity(model: Callable, tokenizer: Any, text: str, window: int = 512, stride: int | None = None,
               batch_size: int = 4, device: torch.device | str | None = None) -> PerplexityResult:
    """Perplexity / bits per byte of `text` (see module docstring). stride defaults to window // 2."""
    stride = effective_stride(window, stride)
    ids, n_bytes = tokenize_for_ppl(text, tokenizer)
    windows = sliding_windows(len(ids), window, stride)
    res = PerplexityResult(0.0, 0, n_bytes, window, stride)
    for w, nll in window_nll(model, ids, windows, batch_size, device):
        res.nll_sum += nll
        res.n_tokens += w.n_scored
        res.per_window.append({**asdict(w), "n_scored": w.n_scored, "nll_sum": nll})
    return res


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
