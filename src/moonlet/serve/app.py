"""The OpenAI-compatible HTTP API (FastAPI) on top of the engine loop.

    app = create_app(engine, model_name="tiny")         # then: uvicorn.run(app, host="127.0.0.1")

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /metrics (Prometheus
text), GET /health, GET / (the chat page), plus FastAPI's /openapi.json and /docs. With an API key,
every /v1 route and /metrics need it (request counts and load are the operator's business;
`public_metrics=True` opens /metrics to a scraper that cannot send a key); /health stays open for
liveness probes, and the page and the docs hold no data.

A request becomes one scheduler job per choice (n) and per prompt; its tokens come back as
TokenEvents and leave as JSON (collected) or server-sent events (stream=true, ending in `data: [DONE]`).
A client that goes away aborts its jobs, which frees their batch slots.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from . import errors
from .errors import APIError
from .loop import EngineFailure, EngineLoop, Metrics, Refused, QueueFull, ShuttingDown
from .schemas import (MAX_N, UNSUPPORTED, UNSUPPORTED_OK, ChatCompletion, ChatCompletionRequest, Completion,
                      CompletionRequest, ErrorResponse, ModelCard, ModelList)

if TYPE_CHECKING:
    from moonlet.infer.engine import Engine

log = logging.getLogger("moonlet.serve")
STATIC = Path(__file__).parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}


@dataclass
class ServerState:
    engine: "Engine"
    model_name: str
    loop: EngineLoop
    metrics: Metrics
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    public_metrics: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_seq(self) -> int:
        return int(self.engine.max_seq)


# ---------------------------------------------------------------------------------------------
# app


def create_app(engine: "Engine", model_name: str = "moonlet", *, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, max_body_bytes: int = 1 << 20, public_metrics: bool = False) -> FastAPI:
    """The server for one engine. The engine loop starts and stops with the app (ASGI lifespan)."""
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer (text in, text out)")
    metrics = Metrics()
    loop = EngineLoop(engine, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    state = ServerState(engine, model_name, loop, metrics, api_key or None, max_body_bytes, public_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="moonlet", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server for a moonlet checkpoint (continuous batching).")
    app.state.moonlet = state
    errors.install(app)
    app.add_middleware(_BodyLimitAndCount, state=state)

    v1 = APIRouter(prefix="/v1", responses=_ERRORS)  # (the API key is checked by the middleware, as on /metrics)
    v1.add_api_route("/chat/completions", _chat, methods=["POST"], response_model=None,
                     responses={200: {"model": ChatCompletion, "description": "JSON, or server-sent events "
                                      "of chat.completion.chunk objects when stream=true"}})
    v1.add_api_route("/completions", _completions, methods=["POST"], response_model=None,
                     responses={200: {"model": Completion}})
    v1.add_api_route("/models", _models, methods=["GET"], response_model=ModelList)
    v1.add_api_route("/models/{model}", _model, methods=["GET"], response_model=ModelCard)
    app.include_router(v1)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.moonlet


def _key_error(api_key: str | None, headers: dict[bytes, bytes]) -> APIError | None:
    """None when the request may pass: no key configured, or `Authorization: Bearer <key>` (or
    `x-api-key: <key>`) matches (constant-time comparison)."""
    if api_key is None:
        return None
    auth = headers.get(b"authorization", b"").decode("latin-1")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
    if not given:
        return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        return APIError(401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


class _BodyLimitAndCount:
    """ASGI middleware, in front of everything: the API key on /v1 and /metrics (401 before any body),
    POST bodies read up to the limit (413 beyond it, whether announced by Content-Length or streamed
    chunked) before the app sees them, and a count of requests by route and status for /metrics."""

    ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/"}  # else "other"

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        status = [500]

        async def send_counted(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            headers = dict(scope.get("headers") or [])
            path = scope["path"]
            if path == "/v1" or path.startswith("/v1/") or (path == "/metrics" and not self.state.public_metrics):
                err = _key_error(self.state.api_key, headers)
                if err is not None:
                    return await err.response()(scope, receive, send_counted)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_counted)
            limit = self.state.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await _too_large(limit, send_counted)
            chunks, total = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                total += len(chunks[-1])
                if total > limit:
                    return await _too_large(limit, send_counted)
                if not msg.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_replayed() -> dict:  # the body once, then the client's later messages
                return replay.pop() if replay else await receive()

            if scope["path"].startswith("/v1/") and not headers.get(b"content-type", b"").startswith(b"application/json"):
                # read any POST body as JSON (`curl -d` sends form-urlencoded); FastAPI keys off this header
                headers[b"content-type"] = b"application/json"
                scope = {**scope, "headers": list(headers.items())}
            await self.app(scope, receive_replayed, send_counted)
        finally:
            with self.state.metrics.lock:
                self.state.metrics.requests[(route, status[0])] += 1


async def _too_large(limit: int, send: Any) -> None:
    resp = errors.error_response(413, f"request body too large (limit {limit} bytes)", code="request_too_large")
    await resp({"type": "http"}, None, send)


# ---------------------------------------------------------------------------------------------
# simple routes


def _card(s: ServerState) -> dict:
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "moonlet",
            "max_model_len": s.max_seq}


async def _models(request: Request) -> dict:
    return {"object": "list", "data": [_card(_state(request))]}


async def _model(request: Request, model: str) -> dict:
    s = _state(request)
    _check_model(s, model)
    return _card(s)


async def _health(request: Request) -> JSONResponse:
    s = _state(request)
    status = "ok" if s.loop.alive and not s.loop.draining else "shutting_down" if s.loop.draining else "engine_down"
    body = {"status": status, "model": s.model_name, "running": s.loop.num_running, "queued": s.loop.queued}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def _metrics(request: Request) -> PlainTextResponse:
    s = _state(request)
    m, lp = s.metrics, s.loop
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP moonlet_{name} {help_}")
        lines.append(f"# TYPE moonlet_{name} {kind}")
        lines.extend(f"moonlet_{name}{labels} {value:g}" for labels, value in samples)

    with m.lock:
        reqs = sorted(m.requests.items())
        counters = (m.prompt_tokens, m.generated_tokens, m.steps, m.aborted, m.engine_errors,
                    m.ttft_sum, m.ttft_count)
    metric("requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{route="{r}",status="{c}"}}', n) for (r, c), n in reqs] or [('{route="/",status="200"}', 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted to the engine.", [("", counters[0])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", counters[1])])
    metric("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {m.window_s:g} s.",
           [("", m.tokens_per_second())])
    metric("decode_steps_total", "counter", "Engine steps (one decode step of the whole batch).", [("", counters[2])])
    metric("requests_aborted_total", "counter", "Requests aborted (client went away).", [("", counters[3])])
    metric("engine_errors_total", "counter", "Engine steps that raised.", [("", counters[4])])
    metric("time_to_first_token_seconds", "summary", "Time from admission to the first generated token.",
           [("_sum", counters[5]), ("_count", counters[6])])
    metric("queue_length", "gauge", "Requests waiting for a batch slot.", [("", lp.queued)])
    metric("running_requests", "gauge", "Sequences in the running batch.", [("", lp.num_running)])
    metric("cache_usage", "gauge", "Fraction of the KV cache in use (0..1).", [("", lp.cache_usage)])
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def _index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


# ---------------------------------------------------------------------------------------------
# building jobs


def _refuse_unsupported(req: Any) -> None:
    extra = req.model_extra or {}
    for name, why in UNSUPPORTED.items():
        if name in extra and extra[name] not in UNSUPPORTED_OK.get(name, (None,)):
            raise APIError(400, f"'{name}': {why} by this server", param=name, code="unsupported_parameter")
    if req.n > MAX_N:
        raise APIError(400, f"'n' = {req.n} is too large: at most {MAX_N} choices per request", param="n",
                       code="unsupported_value")


def _check_model(s: ServerState, model: str) -> None:
    if model != s.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{s.model_name}' "
                       "(GET /v1/models)", param="model", code="model_not_found")


def _sampling(s: ServerState, req: Any, prompt_len: int, max_tokens: int | None, choice: int,
              logprobs: bool, top_logprobs: int) -> Any:
    """One choice's SamplingParams. The engine itself stops on the tokenizer's eos and end-of-turn."""
    from moonlet.infer.engine import SamplingParams

    room = s.max_seq - prompt_len
    try:
        return SamplingParams(
            max_new_tokens=min(max_tokens, room) if max_tokens is not None else room,
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty, seed=None if req.seed is None else req.seed + choice,
            stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"invalid sampling parameters: {e}", code="invalid_value") from None


def _check_length(s: ServerState, n_prompt: int, param: str) -> None:
    if n_prompt >= s.max_seq:
        raise APIError(400, f"This model's maximum context length is {s.max_seq} tokens, but the prompt has "
                       f"{n_prompt} tokens (it must leave room for at least one generated token). Shorten the "
                       f"{param}.", param=param, code="context_length_exceeded")


def _chat_prompt(s: ServerState, req: ChatCompletionRequest) -> list[int]:
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages", code="empty_array")
    msgs = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role '{m.role}' is not supported (system, developer, user, "
                           "assistant)", param=f"messages[{i}].role", code="invalid_value")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text":
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, got "
                                   f"'{part.type}'", param=f"messages[{i}].content[{j}].type",
                                   code="unsupported_value")
                if part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}] has no 'text'",
                                   param=f"messages[{i}].content[{j}].text", code="missing_required_parameter")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        msgs.append({"role": role, "content": _valid_text(content, f"messages[{i}].content")})
    try:
        return list(s.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    except ValueError as e:
        raise APIError(400, f"cannot apply the chat template: {e}; use /v1/completions", param="messages",
                       code="invalid_value") from None


def _valid_text(text: str, param: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{param}' is not valid Unicode text ({e.reason} at position {e.start})", param=param,
                       code="invalid_value") from None
    return text


def _completion_prompts(s: ServerState, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif len(p) == 0:
        raise APIError(400, "'prompt' must not be an empty list", param="prompt", code="empty_array")
    elif isinstance(p[0], int):
        texts = [p]
    else:
        texts = list(p)
    out = []
    vocab = s.engine.vocab_size
    for t in texts:
        if isinstance(t, str):
            ids = s.engine.encode(_valid_text(t, "prompt"))  # as Engine.generate encodes it (bos included)
        else:
            ids = list(t)
            bad = [x for x in ids if not 0 <= x < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {vocab})", param="prompt",
                               code="invalid_value")
        if not ids:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        out.append(ids)
    return out


async def _submit(s: ServerState, prompts: list[tuple[list[int], Any]], q: asyncio.Queue,
                  param: str) -> list[Any]:
    aloop = asyncio.get_running_loop()

    def sink(index: int, item: Any) -> None:
        aloop.call_soon_threadsafe(q.put_nowait, (index, item))

    try:
        return await s.loop.submit(prompts, sink)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
    except Refused as e:  # the engine refused the request (its message says why, its code which kind)
        where = param if e.code == "context_length_exceeded" else None
        raise APIError(400, str(e), param=where, code=e.code) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), code="shutting_down") from None


def _token_str(tok: Any, token_id: int) -> str:
    return tok.decode([token_id], skip_special=False)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what `tokenizers`' ByteLevel uses): printable char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes(tok: Any, token_id: int) -> list[int]:
    """The token's own bytes (OpenAI's `bytes`): exact for byte-level BPE even when the token is part
    of a multi-byte character (its decoded text would be U+FFFD); else the UTF-8 of its text."""
    piece = tok.id_to_token(token_id)
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece) and token_id not in tok.special_ids:
        return [table[ch] for ch in piece]
    return list(_token_str(tok, token_id).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# collecting events


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # per logprob: characters of text before its event
    n_chars: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0  # the engine's count (stop tokens included), from the final event


def _apply(c: _Choice, ev: Any) -> None:
    if ev.token_id is not None and ev.logprob is not None:
        c.logprobs.append((int(ev.token_id), float(ev.logprob), list(ev.top_logprobs or [])))
        c.offsets.append(c.n_chars)
    if ev.text_delta:
        c.text.append(ev.text_delta)
        c.n_chars += len(ev.text_delta)
    if ev.finished:
        c.finish_reason = ev.finish_reason
        c.completion_tokens = ev.completion_tokens


def _finish_reason(ev_reason: str | None) -> str:
    return ev_reason or "stop"


def _failure(ev: EngineFailure) -> APIError:
    return APIError(503 if ev.code == "shutting_down" else 500, ev.message, code=ev.code)


def _aborted() -> APIError:
    return APIError(500, "the engine aborted the request", code="engine_error")


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    done = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


async def _drain(jobs: list[Any], q: asyncio.Queue, choices: list[_Choice],
                 idle: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[tuple[int, Any, int, int]]:
    """The jobs' events as they arrive, each applied to its choice, until every job finished ->
    (index, event, logprobs the choice had before it, jobs left); an engine failure or an abort raises
    its APIError. `idle` is awaited after each 0.5 s without events (the non-streaming routes' check
    for a closed connection)."""
    left = len(jobs)
    while left:
        if idle is None:
            index, ev = await q.get()
        else:
            try:
                index, ev = await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                await idle()
                continue
        if isinstance(ev, EngineFailure):
            raise _failure(ev)
        n_lp = len(choices[index].logprobs)
        _apply(choices[index], ev)
        if ev.finished:
            left -= 1
            if ev.finish_reason == "abort":
                raise _aborted()
        yield index, ev, n_lp, left


async def _collect(request: Request, s: ServerState, jobs: list[Any], q: asyncio.Queue) -> list[_Choice]:
    """Wait for every job to finish; abort them if the client disconnects meanwhile."""
    choices = [_Choice() for _ in jobs]

    async def idle() -> None:
        if await request.is_disconnected():
            raise APIError(499, "client closed the request")

    try:
        async for _ in _drain(jobs, q, choices, idle):
            pass
    except BaseException:
        s.loop.abort(jobs)
        raise
    return choices


def _chat_logprobs(tok: Any, c: _Choice) -> dict:
    def entry(tid: int, lp: float) -> dict:
        return {"token": _token_str(tok, tid), "logprob": lp, "bytes": _token_bytes(tok, tid)}

    return {"content": [{**entry(tid, lp), "top_logprobs": [entry(int(a), float(b)) for a, b in top]}
                        for tid, lp, top in c.logprobs]}


def _completion_logprobs(tok: Any, c: _Choice) -> dict:
    """Legacy logprobs. text_offset: where in the returned text a token's event put its text (the
    characters produced before it; text held back for a stop string or an unfinished UTF-8 character
    counts when it is released), the same whether the response streams or not."""
    return {"tokens": [_token_str(tok, tid) for tid, _, _ in c.logprobs],
            "token_logprobs": [lp for _, lp, _ in c.logprobs],
            "top_logprobs": [{_token_str(tok, int(a)): float(b) for a, b in top} for _, _, top in c.logprobs],
            "text_offset": list(c.offsets)}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _event_stream(jobs: list[Any], q: asyncio.Queue, head: dict, n_prompt: int, include_usage: bool,
                        chunks: Callable[[int, Any, _Choice], list[dict]], opening: tuple[dict, ...] = ()
                        ) -> AsyncIterator[bytes]:
    """What both streams share: the queue drained until every choice finished, each event turned into
    the route's `chunks(index, event, new)` (new: the event's logprobs and their offsets; "choices" entries, one per SSE chunk), an engine
    failure or abort as an in-band error; usage on the last chunk, or with include_usage (OpenAI's
    stream_options) as `usage: null` on every chunk and a final chunk of its own; always `[DONE]`."""
    if include_usage:
        head = {**head, "usage": None}
    for entry in opening:
        yield _sse({**head, "choices": [entry]})
    choices = [_Choice() for _ in jobs]
    try:
        async for index, ev, n_lp, left in _drain(jobs, q, choices):
            c = choices[index]
            new = _Choice(logprobs=c.logprobs[n_lp:], offsets=c.offsets[n_lp:])
            out = [{**head, "choices": [entry]} for entry in chunks(index, ev, new)]
            if out and ev.finished and not left and not include_usage:  # usage in every response: on the last chunk
                out[-1]["usage"] = _usage(n_prompt, choices)
            for chunk in out:
                yield _sse(chunk)
    except APIError as e:  # engine failure or abort: in-band, the stream has started
        yield _sse(e.body())
    else:
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(n_prompt, choices)})
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# POST /v1/chat/completions


async def _chat(request: Request, req: ChatCompletionRequest) -> Any:
    s = _state(request)
    _refuse_unsupported(req)
    _check_model(s, req.model)
    ids = _chat_prompt(s, req)
    _check_length(s, len(ids), "messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    prompts = [(ids, _sampling(s, req, len(ids), max_tokens, i, req.logprobs, top)) for i in range(req.n)]
    q: asyncio.Queue = asyncio.Queue()
    jobs = await _submit(s, prompts, q, "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_response(_chat_events(s, req, jobs, q, rid, created, len(ids), include_usage), s, jobs)
    choices = await _collect(request, s, jobs, q)
    out = []
    for i, c in enumerate(choices):
        out.append({"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": _chat_logprobs(s.tokenizer, c) if req.logprobs else None,
                    "finish_reason": _finish_reason(c.finish_reason)})
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.model_name,
            "choices": out, "usage": _usage(len(ids), choices)}


def _chat_events(s: ServerState, req: ChatCompletionRequest, jobs: list[Any], q: asyncio.Queue, rid: str,
                 created: int, n_prompt: int, include_usage: bool) -> AsyncIterator[bytes]:
    """chat.completion.chunk: a role chunk per choice first, then content deltas, then a finish chunk."""
    def chunks(index: int, ev: Any, new: _Choice) -> list[dict]:
        out = []
        if ev.text_delta or (req.logprobs and new.logprobs):
            lp = _chat_logprobs(s.tokenizer, new) if req.logprobs else None
            out.append({"index": index, "delta": {"content": ev.text_delta or ""}, "logprobs": lp,
                        "finish_reason": None})
        if ev.finished:
            out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(ev.finish_reason)})
        return out

    opening = tuple({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(jobs)))
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model_name}
    return _event_stream(jobs, q, head, n_prompt, include_usage, chunks, opening)


def _stream_response(events: AsyncIterator[bytes], s: ServerState, jobs: list[Any]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as e:  # noqa: BLE001 - the status line is sent already: report in-band
            log.exception("stream failed")
            yield _sse(APIError(500, f"internal error while streaming ({type(e).__name__})",
                                code="internal_error").body())
            yield b"data: [DONE]\n\n"

    return _EventStream(guarded(), on_close=lambda: s.loop.abort(jobs))


class _EventStream(StreamingResponse):
    """Server-sent events that notice a client going away at once (not at the next write, which may be
    far off while the request waits for a slot) and always free the request's slots when they end."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Any):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


# ---------------------------------------------------------------------------------------------
# POST /v1/completions


async def _completions(request: Request, req: CompletionRequest) -> Any:
    s = _state(request)
    _refuse_unsupported(req)
    if req.echo:
        raise APIError(400, "'echo' is not supported by this server", param="echo", code="unsupported_parameter")
    if req.suffix:
        raise APIError(400, "'suffix' (insertion) is not supported by this server", param="suffix",
                       code="unsupported_parameter")
    if req.best_of not in (None, 1, req.n):
        raise APIError(400, "'best_of' is not supported by this server", param="best_of",
                       code="unsupported_parameter")
    _check_model(s, req.model)
    prompt_ids = _completion_prompts(s, req)
    if len(prompt_ids) * req.n > s.loop.max_batch + s.loop.max_queue:
        raise APIError(400, f"{len(prompt_ids)} prompts x n={req.n} choices exceed what the server can hold "
                       f"({s.loop.max_batch + s.loop.max_queue})", param="prompt", code="unsupported_value")
    for ids in prompt_ids:
        _check_length(s, len(ids), "prompt")
    lp = req.logprobs is not None
    prompts = [(ids, _sampling(s, req, len(ids), req.max_tokens, j, lp, req.logprobs or 0))
               for ids in prompt_ids for j in range(req.n)]
    q: asyncio.Queue = asyncio.Queue()
    jobs = await _submit(s, prompts, q, "prompt")
    n_prompt = sum(len(ids) for ids in prompt_ids)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_response(_completion_events(s, req, jobs, q, rid, created, n_prompt, include_usage), s, jobs)
    choices = await _collect(request, s, jobs, q)
    out = [{"index": i, "text": "".join(c.text), "logprobs": _completion_logprobs(s.tokenizer, c) if lp else None,
            "finish_reason": _finish_reason(c.finish_reason)} for i, c in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
            "choices": out, "usage": _usage(n_prompt, choices)}


def _completion_events(s: ServerState, req: CompletionRequest, jobs: list[Any], q: asyncio.Queue, rid: str,
                       created: int, n_prompt: int, include_usage: bool) -> AsyncIterator[bytes]:
    """text_completion chunks: the text delta, its logprobs and (on the last) the finish reason together."""
    lp = req.logprobs is not None

    def chunks(index: int, ev: Any, new: _Choice) -> list[dict]:
        if not (ev.text_delta or ev.finished or (lp and new.logprobs)):
            return []
        return [{"index": index, "text": ev.text_delta or "",
                 "logprobs": _completion_logprobs(s.tokenizer, new) if lp else None,
                 "finish_reason": _finish_reason(ev.finish_reason) if ev.finished else None}]

    head = {"id": rid, "object": "text_completion", "created": created, "model": s.model_name}
    return _event_stream(jobs, q, head, n_prompt, include_usage, chunks)


# ---------------------------------------------------------------------------------------------
# running


class Server:
    """uvicorn for one app, with graceful shutdown. On SIGTERM/SIGINT (or `stop()`): the engine loop
    refuses new requests (503) and uvicorn stops accepting connections; requests in flight get
    `graceful_timeout` seconds to finish; then the engine loop ends whatever still runs with a clean
    error (an error event + [DONE] in a stream, a 503 otherwise), so no client sees a cut connection.
    uvicorn's own timeout, a few seconds later, is only a backstop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
                 log_level: str = "info"):
        import uvicorn

        outer = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                outer._begin_shutdown()
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=graceful_timeout + 5.0, access_log=log_level == "debug")
        self.server = _Uvicorn(config)
        self.app = app
        self.graceful_timeout = graceful_timeout
        self._timer: threading.Timer | None = None

    def run(self, sockets: list | None = None) -> None:
        """Serve until SIGTERM/SIGINT (in the main thread) or `stop()`. `sockets`: already bound
        listening sockets (tests bind port 0 and pass the socket: no race for a free port)."""
        try:
            self.server.run(sockets=sockets)
        finally:
            if self._timer is not None:
                self._timer.cancel()

    def stop(self) -> None:
        self._begin_shutdown()
        self.server.should_exit = True

    def _begin_shutdown(self) -> None:
        loop = self.app.state.moonlet.loop
        loop.drain()
        if self._timer is None:
            self._timer = threading.Timer(self.graceful_timeout, loop.stop)
            self._timer.daemon = True
            self._timer.start()

    @property
    def started(self) -> bool:
        return self.server.started
