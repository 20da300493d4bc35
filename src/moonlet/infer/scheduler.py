"""Step-level continuous batching: requests join between decode steps and leave the moment they finish.

    sched = Scheduler(engine)
    rid = sched.add(prompt_ids, SamplingParams(...))
    while sched.has_work():
        for ev in sched.step(): ...          # TokenEvent per produced token

A step first admits waiting requests while rows are free (prompts of similar length share one
right-padded prefill forward, each on its own row; a request's first token comes from the prefill), then runs ONE batched decode forward over every running
row (or a speculative draft + verify round). Finished and aborted requests free their row at once.
Text is detokenized incrementally; stop strings are held back until they are ruled out, so
streamed text never contains (part of) a stop string.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .cache import KVCache
from .sampling import SamplerState, SamplingParams, sample_token, token_logprobs
from .speculative import after_prefill, speculative_step

if TYPE_CHECKING:
    from .engine import Engine


class ContextLengthExceeded(ValueError):
    """Scheduler.add: the prompt leaves no room for a generated token in the context."""


@dataclass
class TokenEvent:
    request_id: Any
    token_id: int | None  # None only for the final event of an aborted request
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort' when finished
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spec_accept_rate: float | None = None  # on the finished event, with speculative decoding


class IncrementalText:
    """Token ids -> text deltas, with stop strings honoured.

    Decoding re-reads a few tokens before the new ones (byte-level / sentencepiece decoders only
    give the right text for a token in context) and waits while the tail is an incomplete UTF-8
    sequence. Text that could be the start of a stop string is held back until disambiguated."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all decoded text so far
        self.sent = 0  # chars of self.text already emitted
        self.max_stop = max((len(s) for s in stop), default=0)

    def _decode_new(self) -> str:
        if self.tok is None:
            return ""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def push(self, token: int) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit; text then ends before it)."""
        self.ids.append(token)
        self.text += self._decode_new()
        if self.stop:
            start = max(0, self.sent - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out, self.sent = self.text[self.sent:end], end
                self.text = self.text[:end]
                return out, True
            hold = 0
            for s in self.stop:  # longest suffix of the text that begins some stop string
                for n in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
            end = len(self.text) - hold
        else:
            end = len(self.text)
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        """Everything still held back (the request ended without a stop string)."""
        if self.tok is not None and self.read_offset < len(self.ids):  # an unfinished UTF-8 tail
            full = self.tok.decode(self.ids[self.prefix_offset:])
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class Request:
    id: Any
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SamplerState
    text: IncrementalText
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    pending: int | None = None  # sampled, not yet fed to the model
    logprobs: list[dict] | None = None
    finished: bool = False
    finish_reason: str | None = None
    # speculative decoding state (moonlet.infer.speculative)
    draft: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def spec_accept_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


class Scheduler:
    def __init__(self, engine: "Engine", max_batch: int | None = None, max_seq: int | None = None):
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        self.max_seq = min(max_seq or engine.max_seq, engine.max_seq)
        self.cache: KVCache | None = None  # allocated at the first admission
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] owns cache row i
        self._events: list[TokenEvent] = []  # abort notices, delivered by the next step()
        self._ids = itertools.count()

    # ---- public API ------------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: Any = None) -> Any:
        params = params or SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty (at least one token is needed)")
        if len(prompt_ids) >= self.max_seq:
            raise ContextLengthExceeded(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_seq} "
                             f"(the prompt must leave room for at least one generated token)")
        V = self.engine.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {V})")
        rid = next(self._ids) if request_id is None else request_id
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.engine.eos_ids
        req = Request(rid, prompt_ids, params, SamplerState(params, prompt_ids, V),
                      IncrementalText(self.engine.tokenizer, params.stop), frozenset(stop_ids),
                      logprobs=[] if params.wants_logprobs else None)
        self.waiting.append(req)
        return rid

    @torch.inference_mode()
    def abort(self, request_id: Any) -> bool:
        """Drop a request (waiting or running) at once; the next step() reports it finished ('abort')."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                break
        else:
            for req in self.running:
                if req.id == request_id:
                    self._release(req)
                    break
            else:
                return False
        req.finished, req.finish_reason = True, "abort"
        self._events.append(TokenEvent(req.id, None, "", True, "abort",
                                       prompt_tokens=len(req.prompt_ids), completion_tokens=req.completion_tokens))
        return True

    def get(self, request_id: Any) -> Request | None:
        """The live state of a waiting or running request (token ids, text, acceptance counts)."""
        return next((r for r in itertools.chain(self.waiting, self.running) if r.id == request_id), None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._events)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def cache_usage(self) -> float:
        """Fraction of the cache's token slots in use."""
        if self.cache is None:
            return 0.0
        return sum(self.cache.lengths) / (self.cache.max_batch * self.max_seq)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events, self._events = self._events, []
        while self.waiting and len(self.running) < self.max_batch:
            batch = self._admit()
            first = len(self.running)
            self.running += batch
            events += self._prefill(batch, first)
            for req in [r for r in batch if r.finished]:
                self._release(req)
        if self.running:
            if self.engine.speculative:
                events += speculative_step(self, self.running)
            else:
                events += self._decode(self.running)
            for req in [r for r in self.running if r.finished]:
                self._release(req)
        return events

    # ---- internals -------------------------------------------------------------------------------
    def _ensure_cache(self) -> KVCache:
        if self.cache is None:
            extra = 2 * self.engine.speculative  # verify + chained drafts write up to 2k slots past the last token
            self.cache = self.engine.new_cache(self.max_batch, self.max_seq + extra)
        return self.cache

    def _release(self, req: Request) -> None:
        row = self.running.index(req)
        last = len(self.running) - 1
        if row != last:  # keep rows 0..n-1 contiguous: move the last row into the freed one
            self.cache.move(last, row)
            self.running[row] = self.running[last]
        else:
            self.cache.lengths[row] = 0
        self.running.pop()

    # one prefill forward takes prompts while padding them to the longest wastes at most this
    # fraction of its tokens, up to this many tokens in all
    max_pad_fraction = 0.25
    max_prefill_tokens = 4096

    def _admit(self) -> list[Request]:
        """Waiting requests (in order) for the next prefill forward, right-padded to one length."""
        batch = [self.waiting.popleft()]
        if not self.engine.batched_prefill:
            return batch
        while self.waiting and len(self.running) + len(batch) < self.max_batch:
            lens = [len(r.prompt_ids) for r in batch] + [len(self.waiting[0].prompt_ids)]
            padded = max(lens) * len(lens)
            if padded > self.max_prefill_tokens or padded - sum(lens) > self.max_pad_fraction * padded:
                break
            batch.append(self.waiting.popleft())
        return batch

    def _prefill(self, batch: list[Request], first: int) -> list[TokenEvent]:
        """Prefill `batch` into rows first.. -> each request's first token."""
        cache = self._ensure_cache()
        lengths = [len(r.prompt_ids) for r in batch]
        P = max(lengths)
        ids = torch.tensor([r.prompt_ids + [0] * (P - len(r.prompt_ids)) for r in batch])
        logits, hidden = self.engine.prefill(ids, cache.view(first, first + len(batch)), lengths)
        events = []
        for i, (req, n) in enumerate(zip(batch, lengths)):
            row = first + i
            cache.lengths[row] = n
            if self.engine.speculative:
                events += after_prefill(self, req, row, logits[i, -1], hidden[i:i + 1, :n])
            else:
                events.append(self.accept_token(req, row, sample_token(logits[i, -1], req.sampler)[0], logits[i, -1]))
        return events

    def _decode(self, reqs: list[Request]) -> list[TokenEvent]:
        cache = self.cache
        n = len(reqs)
        ids = torch.tensor([[r.pending] for r in reqs])
        pos = torch.tensor([[cache.lengths[i]] for i in range(n)])
        logits, _ = self.engine.decode(ids, pos, cache.view(0, n))
        logits = logits[:, -1]
        for i in range(n):
            cache.lengths[i] += 1
        slow = [not r.params.greedy or r.params.penalized for r in reqs]
        fast = logits.argmax(-1).tolist() if not all(slow) else None
        events = []
        for i, r in enumerate(reqs):
            tok = fast[i] if not slow[i] else sample_token(logits[i], r.sampler)[0]
            events.append(self.accept_token(r, i, tok, logits[i]))
        return events

    def accept_token(self, req: Request, row: int, token: int, logits_V: torch.Tensor | None) -> TokenEvent:
        """Record one produced token of `req` (its row holds the tokens fed so far) -> its event."""
        p = req.params
        req.completion_tokens += 1
        req.sampler.update(token)
        lp = None
        if req.logprobs is not None and logits_V is not None:
            lp = token_logprobs(logits_V, token, p.top_logprobs)
            req.logprobs.append(lp)
        if token in req.stop_ids:
            delta, reason = req.text.flush(), "stop"
        else:
            req.output_ids.append(token)
            delta, hit = req.text.push(token)
            reason = "stop" if hit else None
            if reason is None and (req.completion_tokens >= p.max_new_tokens or self.cache.lengths[row] + 1 >= self.max_seq):
                reason = "length"
                delta += req.text.flush()
        if reason is not None:
            req.finished, req.finish_reason, req.pending = True, reason, None
        else:
            req.pending = token
        return TokenEvent(req.id, token, delta, reason is not None, reason,
                          None if lp is None else lp["logprob"], None if lp is None else lp["top_logprobs"],
                          len(req.prompt_ids), req.completion_tokens,
                          req.spec_accept_rate if reason is not None else None)
