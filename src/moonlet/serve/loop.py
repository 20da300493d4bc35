"""The one engine loop: a background thread that owns the Scheduler and does continuous batching.

The Scheduler is not thread-safe, and need not be: it is built in __init__ (before the thread starts)
and afterwards only the loop thread calls it (add, step, abort, has_work, the gauges: everything under
`_run`), while HTTP handlers (asyncio, uvicorn's thread) only touch the inbox and abort lists under
`_lock` and read the gauges `_snapshot` copies. Handlers `submit` jobs to the inbox; the loop thread,
between two decode steps, adds waiting jobs to the scheduler (so they join the running batch at the
next step) and executes aborts (a disconnected client frees its slot before the next step). Each
step's TokenEvents go back to the handler that owns the request through its asyncio loop
(`call_soon_threadsafe`). Finished requests leave the batch inside the scheduler at once.

Admission: at most `max_batch` sequences run, at most `max_queue` more wait; beyond that `submit`
raises QueueFull (-> 429) without touching the engine. A prompt the engine refuses (longer than the
context, a token outside the vocabulary) raises Refused (-> 400) from `submit` with the engine's message
and an OpenAI error code; an EngineFailure carries its code too, so the HTTP side never reads messages.
Shutdown: `drain()` refuses new work while running requests finish; `stop()` ends the rest with an
error event and joins the thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..infer.scheduler import ContextLengthExceeded

if TYPE_CHECKING:
    from moonlet.infer.engine import Engine

log = logging.getLogger("moonlet.serve")


class QueueFull(Exception):
    pass


class Refused(ValueError):
    """The engine's Scheduler.add refused the request. `code` is OpenAI's: 'context_length_exceeded'
    (the prompt leaves no room in the scheduler's context) or 'invalid_value' (anything else)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class ShuttingDown(Exception):
    pass


@dataclass
class EngineFailure:
    """Delivered instead of a TokenEvent when the engine raised ('engine_error') or the server
    stopped before the request finished ('shutting_down')."""

    message: str
    code: str = "engine_error"


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: Any  # moonlet.infer.engine.SamplingParams
    index: int  # choice index inside its HTTP request
    sink: Callable[[int, Any], None]  # (index, TokenEvent | EngineFailure), called on the loop thread
    rid: Any = None
    cancelled: bool = False
    done: bool = False
    on_added: Callable[[], None] | None = None  # wakes the submitting handler
    add_error: BaseException | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


class Metrics:
    """Counters for GET /metrics (Prometheus text). Written by the loop thread, read by handlers."""

    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (route, status)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.aborted = 0
        self.engine_errors = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step

    def record_step(self, n_tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.steps += 1
            self.generated_tokens += n_tokens
            self._recent.append((now, n_tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        return total / self.window_s


class EngineLoop:
    def __init__(self, engine: "Engine", max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.sched = engine.scheduler(max_batch=max_batch)  # moonlet.infer.scheduler.Scheduler
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Job] = []  # jobs to add, in order
        self._aborts: list[Job] = []
        self._active: set[Job] = set()  # submitted and not finished (admission control counts these)
        self._by_rid: dict[Any, Job] = {}
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_running = 0  # snapshot of the scheduler after the last step (for /metrics)
        self.num_waiting = 0
        self.cache_usage = 0.0

    # ---- called from HTTP handlers -------------------------------------------------------------

    def start(self) -> "EngineLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moonlet-engine-loop", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        with self._lock:
            return max(0, len(self._active) - self.max_batch)

    async def submit(self, prompts: list[tuple[list[int], Any]],
                     sink: Callable[[int, Any], None]) -> list[Job]:
        """Queue one job per (prompt_ids, params); all are admitted or none. Waits until the loop thread
        has handed them to the scheduler, so a refused prompt raises here, before any response starts."""
        aloop = asyncio.get_running_loop()
        futs = [aloop.create_future() for _ in prompts]

        def waker(f: asyncio.Future) -> Callable[[], None]:
            return lambda: aloop.call_soon_threadsafe(lambda: f.done() or f.set_result(None))

        jobs = [Job(ids, params, i, sink, on_added=waker(f)) for i, ((ids, params), f) in enumerate(zip(prompts, futs))]
        with self._lock:
            if self._draining or self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._active) + len(jobs) > self.max_batch + self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._active)} requests running or queued "
                                f"(max_batch {self.max_batch} + max_queue {self.max_queue}); retry later")
            self._active.update(jobs)
            self._inbox.extend(jobs)
            self._wake.notify()
        pending = set(futs)  # the loop adds them between two steps: one step's wait at most
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=1.0)
                if pending and (self._thread is None or not self._thread.is_alive()):
                    raise ShuttingDown("the engine loop is not running")
        except BaseException:  # cancelled (client gone) or loop dead: nobody will read these jobs
            self.abort(jobs)
            raise
        err = next((j.add_error for j in jobs if j.add_error is not None), None)
        if err is not None:  # Refused, ShuttingDown (the loop died), or an engine bug (-> 500)
            self.abort(jobs)
            raise err
        return jobs

    def abort(self, jobs: list[Job]) -> None:
        """Free the slots of these jobs (client went away). Safe to call twice or after they finished."""
        with self._lock:
            for j in jobs:
                if not j.done and not j.cancelled:
                    j.cancelled = True
                    self._aborts.append(j)
            self._wake.notify()

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse new work; running and queued requests go on to finish."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; requests still running get an EngineFailure ('server shutting down')."""
        with self._lock:
            self._draining = self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        # the whole thread is inference: the scheduler's cache tensors (created under inference_mode)
        # may then be updated in place by abort() as well as by step()
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as e:  # a bug in the loop itself: fail what is running, refuse new work (503)
            log.exception("the engine loop died")
            with self._lock:
                self._draining = self._stopping = True
            self._fail_all(EngineFailure(f"the engine loop failed ({type(e).__name__}: {e})"))
            for j in self._inbox:  # submitted but never added: wake their handlers
                j.add_error = ShuttingDown("the engine loop is not running")
                self._finish(j)
                if j.on_added is not None:
                    j.on_added()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._stopping or self.sched.has_work()):
                    self._wake.wait(0.5)
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for j in aborts:
                self._abort_one(j)
            for j in inbox:
                self._add_one(j)
            if stopping:
                self._fail_all(EngineFailure("the server is shutting down; the request was not finished",
                                             "shutting_down"))
                return
            if self.sched.has_work():
                self._step()
            self._snapshot()

    def _add_one(self, j: Job) -> None:
        try:
            if not j.cancelled:
                j.rid = self.sched.add(j.prompt_ids, j.params)
                self._by_rid[j.rid] = j
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(j.prompt_ids)
            else:
                self._finish(j)
        except ContextLengthExceeded as e:  # the one refusal OpenAI names
            j.add_error = Refused(str(e), "context_length_exceeded")
            self._finish(j)
        except ValueError as e:  # any other refusal of the scheduler
            j.add_error = Refused(str(e), "invalid_value")
            self._finish(j)
        except Exception as e:  # noqa: BLE001 - an engine bug must not take the loop down
            j.add_error = e
            self._finish(j)
        finally:
            if j.on_added is not None:
                try:
                    j.on_added()
                except RuntimeError:  # the handler's event loop is gone
                    pass

    def _abort_one(self, j: Job) -> None:
        if j.rid is not None and j.rid in self._by_rid:
            try:
                self.sched.abort(j.rid)
            except Exception:  # noqa: BLE001
                log.exception("scheduler.abort failed")
            with self.metrics.lock:
                self.metrics.aborted += 1
            self._finish(j)

    def _finish(self, j: Job) -> None:
        j.done = True
        self._by_rid.pop(j.rid, None)
        with self._lock:
            self._active.discard(j)

    def _step(self) -> None:
        try:
            events = self.sched.step()
        except Exception as e:  # noqa: BLE001 - an engine bug ends the batch, not the server
            log.exception("engine step failed")
            with self.metrics.lock:
                self.metrics.engine_errors += 1
            self._fail_all(EngineFailure(f"the engine failed during generation ({type(e).__name__}: {e})"))
            return
        now = time.perf_counter()
        n_tokens = 0
        for ev in events:
            j = self._by_rid.get(ev.request_id)
            if j is None:  # aborted meanwhile
                continue
            if ev.token_id is not None:
                n_tokens += 1
                if j.t_first is None:
                    j.t_first = now
                    with self.metrics.lock:
                        self.metrics.ttft_sum += now - j.t_submit
                        self.metrics.ttft_count += 1
            if ev.finished:
                self._finish(j)
            if not j.cancelled:
                self._deliver(j, ev)
        self.metrics.record_step(n_tokens)

    def _snapshot(self) -> None:
        """The scheduler's gauges, copied for /metrics (handlers never read the scheduler itself)."""
        self.num_running = self.sched.num_running
        self.num_waiting = self.sched.num_waiting
        self.cache_usage = self.sched.cache_usage

    def _deliver(self, j: Job, item: Any) -> None:
        try:
            j.sink(j.index, item)
        except Exception:  # noqa: BLE001 - e.g. the handler's event loop already closed
            log.debug("dropping an event for a closed request", exc_info=True)

    def _fail_all(self, failure: EngineFailure) -> None:
        for j in list(self._by_rid.values()):
            try:
                self.sched.abort(j.rid)
            except Exception:  # noqa: BLE001
                pass
            self._finish(j)
            if not j.cancelled:
                self._deliver(j, failure)
        self.num_running = self.num_waiting = 0
