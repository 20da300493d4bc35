"""`Engine`: batched generation with MLA's latent KV cache, on top of the step-level `Scheduler`.

    eng = Engine(model, tokenizer=tok)                   # or Engine.from_pretrained(checkpoint_dir)
    eng.generate(["2+3=", [1, 5, 9]], SamplingParams(max_new_tokens=32))   # -> [GenerationResult]
    for ev in eng.stream("Once upon", SamplingParams(temperature=0.8, seed=1)): print(ev.text_delta)

`generate` and `stream` run a private Scheduler (one code path with the server's loop). The model
is called through `prefill` / `decode`, which pick the fast inference path when the config allows
(moonlet.infer.fastpath) and otherwise the model's own forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..model import CausalLM, LayerCache
from . import fastpath
from .compiled import CompiledDecode
from .cache import KVCache
from .sampling import SamplingParams
from .scheduler import Request, Scheduler, TokenEvent

__all__ = ["Engine", "SamplingParams", "GenerationResult", "Scheduler", "TokenEvent"]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (a final stop token id is not included)
    finish_reason: str  # 'stop' | 'length' | 'abort'
    prompt_tokens: int
    completion_tokens: int  # generated tokens, including a final stop token
    logprobs: list[dict] | None = None  # per token {"token_id", "logprob", "top_logprobs": [(id, lp)]}
    spec_accept_rate: float | None = None  # accepted / proposed MTP drafts (speculative decoding only)


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Any = None, max_batch: int = 16, max_seq: int | None = None,
                 speculative: int = 0, fast: bool | None = None, compile: bool = False):
        """max_seq: context length per sequence (default: the config's max_position_embeddings, at
        most 4096). speculative: MTP draft tokens per step (0 = off; needs an MTP module).
        fast: use the inference fast path (default: whenever the config allows it).
        compile: decode (and speculative verify / MTP draft) steps through torch.compile graphs
        (infer/compiled.py; each compiles for tens of seconds on first use, then runs 1.4-2.6x faster on a
        CPU whose BLAS matrix-vector product is slow, as on the Zen 5 VM)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_seq = int(max_seq or min(self.cfg.max_position_embeddings, 4096))
        if self.max_seq < 2:
            raise ValueError(f"max_seq must be >= 2, got {self.max_seq}")
        if speculative < 0:
            raise ValueError(f"speculative must be >= 0, got {speculative}")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module; this model has num_nextn_predict_layers = 0")
        self.speculative = int(speculative)
        self.vocab_size = self.cfg.vocab_size
        eos = set(self.cfg.eos_token_ids or [])
        for attr in ("eos_id", "eot_id"):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                eos.add(int(v))
        self.eos_ids = frozenset(eos)
        if fast is None:
            fast = fastpath.supports(self.cfg)
        self.fast = fastpath.FastForward(model) if fast else None
        self.compiled = None
        if compile:
            if self.fast is None:
                raise ValueError("compile needs the fast inference path (plain MLA + MoE configs)")
            self.compiled = CompiledDecode(self.fast)

    def refresh(self) -> None:
        """Re-derive the fast path's (and the compiled step's) weights after changing the model's."""
        if self.fast is not None:
            self.fast.refresh()
        if self.compiled is not None:
            self.compiled.refresh()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = None, keep_quantized: bool = True,
                        **kw: Any) -> "Engine":
        """A checkpoint dir (or training run dir -> newest checkpoint), moonlet or HF DeepSeek-V3 format;
        the tokenizer is loaded when the dir has a tokenizer.json (else eng.tokenizer is None).
        keep_quantized: an int4 / int8 (compressed-tensors) checkpoint is served from its stored ints."""
        from ..train.checkpoint import load_model, resolve_checkpoint

        d = resolve_checkpoint(path)
        model = load_model(d, dtype=dtype, keep_quantized=keep_quantized)  # clear errors on damaged files
        tok = None
        if (d / "tokenizer.json").is_file():
            from ..data.tokenizer import Tokenizer

            tok = Tokenizer.from_file(d)
        return cls(model, tokenizer=tok, **kw)

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Text -> ids (with the tokenizer's bos token when it has one); ids pass through."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (this checkpoint has no tokenizer.json); "
                                 "pass token ids instead")
            return list(self.tokenizer.encode(prompt, add_bos=getattr(self.tokenizer, "bos_id", None) is not None))
        return [int(t) for t in prompt]

    # ---- generation ------------------------------------------------------------------------------
    def scheduler(self, max_batch: int | None = None, max_seq: int | None = None) -> Scheduler:
        return Scheduler(self, max_batch=max_batch, max_seq=max_seq)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            raise ValueError("generate takes a list of prompts (text or token-id lists); use [prompt]")
        params = params or SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        if not prompts:
            return []
        ids = [self.encode(p) for p in prompts]
        need = max(len(i) + p.max_new_tokens for i, p in zip(ids, plist))
        sched = self.scheduler(max_batch=min(self.max_batch, len(ids)), max_seq=min(self.max_seq, need))
        rids = [sched.add(i, p) for i, p in zip(ids, plist)]
        reqs: dict[Any, Request] = {r.id: r for r in sched.waiting}
        while sched.has_work():
            sched.step()
        return [self._result(reqs[rid]) for rid in rids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """One request's TokenEvents as they are produced (the last one has finished=True)."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        sched = self.scheduler(max_batch=1, max_seq=min(self.max_seq, len(ids) + params.max_new_tokens))
        rid = sched.add(ids, params)
        while sched.has_work():
            for ev in sched.step():
                if ev.request_id == rid:
                    yield ev

    @staticmethod
    def _result(req: Request) -> GenerationResult:
        return GenerationResult(req.text.text, list(req.output_ids), req.finish_reason or "abort",
                                len(req.prompt_ids), req.completion_tokens, req.logprobs, req.spec_accept_rate)

    # ---- model calls (used by the scheduler) -------------------------------------------------------
    def new_cache(self, max_batch: int, max_seq: int) -> KVCache:
        return KVCache(self.cfg, max_batch, max_seq, dtype=self.model.dtype, device=self.model.device,
                       mtp=bool(self.speculative))

    @property
    def batched_prefill(self) -> bool:
        """Whether several prompts can share one right-padded prefill forward (the fast path only:
        Engram's decode state would take in the padding)."""
        return self.fast is not None

    def prefill(self, ids_NP: torch.Tensor, cache: list[LayerCache], lengths: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh sequences' prompts (right-padded to P; lengths: the real ones) into their empty cache
        rows -> (logits at each row's last prompt token [N,1,V] float32, hidden [N,P,D])."""
        N, P = ids_NP.shape
        lengths = lengths or [P] * N
        if N > 1 and not self.batched_prefill:
            raise ValueError("batched prefill needs the fast inference path")
        pos = torch.arange(P)[None].expand(N, P)
        if self.fast is not None:
            last = None if all(n == P for n in lengths) else torch.tensor(lengths) - 1
            logits, hidden = self.fast(ids_NP, pos, cache, last_only=True, fresh=True, last_index_B=last)
            return logits.float(), hidden
        out = self.model(ids_NP, positions=pos, cache=cache, last_only=True)
        return out.logits.float(), out.hidden

    def decode(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, cache: list[LayerCache],
               last_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens at per-row positions (their cache slots) -> (logits [B,T or 1,V] float32, hidden [B,T,D])."""
        if self.compiled is not None and int(positions_BT.min()) >= 1:
            logits, hidden = self.compiled(ids_BT, positions_BT, cache)
            return (logits[:, -1:] if last_only else logits), hidden
        if self.fast is not None:
            logits, hidden = self.fast(ids_BT, positions_BT, cache, last_only=last_only)
            return logits.float(), hidden
        out = self.model(ids_BT, positions=positions_BT, cache=cache, last_only=last_only)
        return out.logits.float(), out.hidden
