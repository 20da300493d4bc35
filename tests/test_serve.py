"""`moonlet serve` against a live server on 127.0.0.1 (uvicorn in a thread, tiny random checkpoint).

References: greedy completions from moonlet's Engine called directly (a separate Engine on the same
checkpoint), OpenAI's published API shapes (the official `openai` client parses every response), and
each request run alone vs together (continuous batching must not change greedy text).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from _serve_fixtures import LiveServer, make_chat_checkpoint

openai = pytest.importorskip("openai")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_chat_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def ref_engine(ckpt):
    """A second engine on the same checkpoint: direct references, and the small servers' engine."""
    from moonlet.infer.engine import Engine

    return Engine.from_pretrained(ckpt, max_batch=16)


@pytest.fixture(scope="module")
def server(ckpt):
    from moonlet.infer.engine import Engine

    engine = Engine.from_pretrained(ckpt, max_batch=16)
    with LiveServer(engine, api_key=KEY, max_batch=16, max_queue=32, max_body_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(engine, prompt, n: int, **kw):
    from moonlet.infer.engine import SamplingParams

    return engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0, **kw))[0]


def _sse(lines) -> list:
    """`data:` payloads of an SSE response (httpx line iterator) up to [DONE] (included as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    return out


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", headers=AUTH).text.splitlines():  # (a keyless server ignores it)
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ---------------------------------------------------------------------------------------------
# the official client


def test_openai_client_chat_and_completions(server, client, ref_engine):
    tok = ref_engine.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ref = _greedy(ref_engine, ids, 12)

    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), ref.completion_tokens)
    assert r.usage.total_tokens == len(ids) + ref.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage the usage still comes, on the last chunk
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)

    prompt = "The quick brown"
    ref = _greedy(ref_engine, prompt, 10)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(ref_engine.encode(prompt)) and r.usage.completion_tokens == ref.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens

    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_sampling_options(client, ref_engine):
    tok = ref_engine.tokenizer
    msgs = [{"role": "user", "content": "Hello there, how are you today?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ref = _greedy(ref_engine, ids, 16, ignore_eos=True, logprobs=True, top_logprobs=2)
    # a stop string cut out of the greedy text: the reply ends right before it
    assert len(ref.text) >= 6, ref.text
    stop = ref.text[3:5]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref.text[:ref.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # logprobs: the engine's numbers, in OpenAI's shape
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, n=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    lp = r.choices[1].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp)
    assert lp[0].logprob == pytest.approx(ref.logprobs[0]["logprob"], abs=1e-4)
    assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[1].logprob
    # `bytes` are the tokens' own bytes: together they spell the reply (a token may hold half a character)
    specials = {tok.decode([i], skip_special=False) for i in tok.special_ids}  # in logprobs, not in the text
    spelled = bytes(b for t in lp if t.token not in specials for b in t.bytes).decode("utf-8", errors="replace")
    assert spelled.startswith(r.choices[1].message.content), (spelled, r.choices[1].message.content)
    assert r.usage.completion_tokens == 8
    # seeded sampling is reproducible
    kw = dict(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b
    # legacy completions: a batch of prompts x n, with logprobs
    r = client.completions.create(model="tiny", prompt=["To be", "Hello"], max_tokens=3, n=2, temperature=0,
                                  logprobs=1, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == _greedy(ref_engine, "To be", 3, ignore_eos=True).text
    assert r.choices[2].text == _greedy(ref_engine, "Hello", 3, ignore_eos=True).text
    assert len(r.choices[2].logprobs.tokens) == 3 and len(r.choices[2].logprobs.top_logprobs[0]) == 1
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(ref_engine.encode("To be")) + len(ref_engine.encode("Hello"))
    ids = [5, 6, 7]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert r.choices[0].text == _greedy(ref_engine, ids, 3).text and r.usage.prompt_tokens == 3


def test_streams_carry_logprobs_and_usage(server, ref_engine):
    """Streamed logprobs (chat and legacy completions, n=2) are the engine's, in OpenAI's chunk shapes;
    without include_usage the usage rides on the last chunk only."""
    tok = ref_engine.tokenizer
    ref = _greedy(ref_engine, "To be", 5, ignore_eos=True, logprobs=True, top_logprobs=1)
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "n": 2,
            "logprobs": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert [("usage" in e) for e in events[:-1]] == [False] * (len(events) - 2) + [True]
    assert events[-2]["usage"]["completion_tokens"] == 10
    for i in (0, 1):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == ref.text
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [ref.finish_reason]
        lps = [c["logprobs"] for c in mine if c["logprobs"]["tokens"]]
        assert [lp["token_logprobs"][0] for lp in lps] == pytest.approx([x["logprob"] for x in ref.logprobs], abs=1e-4)
        # a chunk's text_offset: the characters streamed before it (text held back for a stop string or
        # an unfinished UTF-8 character counts when it is sent)
        assert [c["logprobs"]["text_offset"][0] for c in mine if c["logprobs"]["tokens"]] == \
            [len("".join(d["text"] for d in mine[:k])) for k, c in enumerate(mine) if c["logprobs"]["tokens"]]
    # the same request, not streamed: the same offsets (each token's event's place in the text)
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "n": 1}, headers=AUTH,
                       timeout=60).json()["choices"][0]
    assert whole["logprobs"]["text_offset"] == [c["logprobs"]["text_offset"][0] for c in mine if c["logprobs"]["tokens"]]
    assert whole["text"] == "".join(c["text"] for c in mine)
    msgs = [{"role": "user", "content": "Hello"}]
    ref = _greedy(ref_engine, tok.apply_chat_template(msgs, add_generation_prompt=True), 4, ignore_eos=True,
                  logprobs=True, top_logprobs=2)
    body = {"model": "tiny", "messages": msgs, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        events = _sse(r.iter_lines())
    content = [t for e in events[:-1] if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]]
    assert [t["logprob"] for t in content] == pytest.approx([x["logprob"] for x in ref.logprobs], abs=1e-4)
    assert all(len(t["top_logprobs"]) == 2 for t in content)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == ref.finish_reason and "usage" in events[-2]


# ---------------------------------------------------------------------------------------------
# continuous batching


PROMPTS = [f"{w} number {i}:" for i, w in enumerate(
    ["Hello", "The fox", "To be", "A stitch", "All that", "What is", "12 + 7", "3 * 4", "The lazy dog",
     "Gold", "Time", "The question", "Nine", "Quick", "Lost", "How are you"])]


def _stream_text(url: str, prompt: str, max_tokens: int, out: dict, key: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    out[key] = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))


def test_16_concurrent_streams_match_each_alone(server):
    alone: dict = {}
    for p in PROMPTS:
        _stream_text(server.url, p, 12, alone, p)
    together: dict = {}
    threads = [threading.Thread(target=_stream_text, args=(server.url, p, 12, together, p)) for p in PROMPTS]
    steps0 = _metric(server.url, "moonlet_decode_steps_total")
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    steps = _metric(server.url, "moonlet_decode_steps_total") - steps0
    assert together == alone
    assert len(set(alone.values())) > 1  # the prompts really differ
    # batched: 16 x 12 tokens took far fewer than 16 x 12 steps (each step decodes the whole batch)
    assert steps < 16 * 12 / 2, steps


def test_cancelled_stream_does_not_stall_others_and_frees_its_slot(server, ref_engine):
    aborted0 = _metric(server.url, "moonlet_requests_aborted_total")
    alone: dict = {}
    for p in PROMPTS[:3]:
        _stream_text(server.url, p, 24, alone, p)
    together: dict = {}
    threads = [threading.Thread(target=_stream_text, args=(server.url, p, 24, together, p)) for p in PROMPTS[:3]]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        for t in threads:
            t.start()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 5:
                break  # leave mid-stream: closing the connection must abort the request
    for t in threads:
        t.join(60)
    assert together == alone
    assert _wait_for(lambda: _metric(server.url, "moonlet_requests_aborted_total") >= aborted0 + 1)
    assert _wait_for(lambda: _metric(server.url, "moonlet_running_requests") == 0)

    # with one slot and no queue, the next request only gets in if the cancelled one left
    with LiveServer(ref_engine, max_batch=1, max_queue=0) as small:
        with httpx.stream("POST", small.url + "/v1/chat/completions", json={**body, "model": "tiny"},
                          timeout=60) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        ok = _wait_for(lambda: httpx.post(small.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200, timeout=10)
        assert ok


def test_queue_full_is_429(ref_engine):
    body = {"model": "tiny", "prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with LiveServer(ref_engine, max_batch=1, max_queue=1) as small, httpx.Client(timeout=60) as h:
        with h.stream("POST", small.url + "/v1/completions", json=body) as running, \
                h.stream("POST", small.url + "/v1/completions", json=body) as queued:
            assert running.status_code == queued.status_code == 200
            lines = running.iter_lines()  # (an abandoned iterator would close the connection)
            next(lines)
            r = httpx.post(small.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
            assert r.status_code == 429 and r.headers.get("retry-after") == "1"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and "max_queue 1" in err["message"]
            assert "queue_length 1" in httpx.get(small.url + "/metrics").text.replace("moonlet_", "")
        # both left: the server answers again
        assert _wait_for(lambda: httpx.post(small.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200)


def test_engine_failure_is_a_clean_500_and_the_server_goes_on(ref_engine):
    with LiveServer(ref_engine, max_batch=2, max_queue=2) as small:
        sched = small.app.state.moonlet.loop.sched
        real_step = sched.step

        def boom():
            sched.step = real_step
            raise RuntimeError("simulated engine fault")

        sched.step = boom
        r = httpx.post(small.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "simulated engine fault" in r.json()["error"]["message"]
        assert _wait_for(lambda: not sched.has_work())  # (the aborts' final events are flushed by a real step)
        sched.step = boom
        with httpx.stream("POST", small.url + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}) as r:
            events = _sse(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
        r = httpx.post(small.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(small.url + "/health").json()["status"] == "ok"
        assert _metric(small.url, "moonlet_engine_errors_total") == 2


# ---------------------------------------------------------------------------------------------
# bad input


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [
    # (route, body (dict, or raw str/bytes), status, param, code)
    ("chat", '{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("chat", "[1, 2]", 400, None, "invalid_json"),
    ("chat", "", 400, None, "invalid_json"),
    ("chat", {**CHAT, "messages": "hi"}, 400, "messages", "invalid_type"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("chat", {**CHAT, "max_tokens": [3]}, 400, "max_tokens", "invalid_type"),
    ("chat", {**CHAT, "messages": [{"content": "no role"}]}, 400, "messages[0].role", "missing_required_parameter"),
    ("chat", {k: v for k, v in CHAT.items() if k != "model"}, 400, "model", "missing_required_parameter"),
    ("chat", {**CHAT, "model": "gpt-17"}, 404, "model", "model_not_found"),
    ("chat", {**CHAT, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("chat", {**CHAT, "n": 0}, 400, "n", "invalid_value"),
    ("chat", {**CHAT, "presence_penalty": -3}, 400, "presence_penalty", "invalid_value"),
    ("chat", {**CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs", "invalid_value"),
    ("chat", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("chat", {**CHAT, "messages": []}, 400, "messages", "empty_array"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type", "unsupported_value"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ("chat", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format", "unsupported_parameter"),
    ("chat", {**CHAT, "n": 1000}, 400, "n", "unsupported_value"),
    ("completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("completions", {"model": "tiny", "prompt": []}, 400, "prompt", "empty_array"),
    ("completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ("completions", {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt", "invalid_type"),
    ("completions", '{"model": "tiny", "prompt": "lone \\ud800 surrogate"}', 400, "prompt", "invalid_value"),
    ("chat", {**CHAT, "seed": 2**70}, 400, "seed", "invalid_value"),
    ("chat", "[" * 5000 + "]" * 5000, 400, None, None),
]


@pytest.mark.parametrize("route,body,status,param,code", BAD, ids=[f"{i}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_status_and_openai_error_shape(server, route, body, status, param, code):
    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error"


def test_limits_routes_and_server_keeps_answering(server, client):
    # a prompt longer than the context: 400 naming both lengths
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": "tiny", "prompt": [5] * 3000, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "2048" in err["message"] and "3000" in err["message"]
    # body over the limit (64 KiB here): 413, by Content-Length and by a chunked body
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   content=(big[i:i + 8192] for i in range(0, len(big), 8192)))
    assert r.status_code == 413
    # unknown route / method, in the same shape
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    # a form-encoded body (curl -d without a content type) is read as JSON
    r = httpx.post(server.url + "/v1/completions", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                   content=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}))
    assert r.status_code == 200
    # the client library maps the statuses to its exceptions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    # and the server still answers
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_engine_refusals_carry_their_code(ref_engine):
    """The scheduler's own checks (a backstop behind the routes' checks) reach the API as explicit codes,
    and a refused request leaves no trace in the loop (reference: Scheduler.add's documented refusals)."""
    import asyncio

    from moonlet.infer.engine import SamplingParams
    from moonlet.serve.loop import EngineLoop, Refused

    loop = EngineLoop(ref_engine, max_batch=1, max_queue=0).start()

    async def run(ids: list[int]):
        q: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        await loop.submit([(ids, SamplingParams(max_new_tokens=2))],
                          lambda i, ev: aloop.call_soon_threadsafe(q.put_nowait, ev))
        while not (ev := await asyncio.wait_for(q.get(), 30)).finished:
            pass
        return ev

    try:
        n = ref_engine.max_seq
        for ids, code in (([5] * n, "context_length_exceeded"), ([5, ref_engine.vocab_size], "invalid_value"),
                          ([], "invalid_value")):
            with pytest.raises(Refused) as e:
                asyncio.run(run(ids))
            assert e.value.code == code, (len(ids), e.value)
            if code == "context_length_exceeded":
                assert str(n) in str(e.value)  # the engine's message names the lengths
        ev = asyncio.run(run([5, 6, 7]))  # one slot, no queue: only free if the refused jobs left
        assert ev.finish_reason in ("stop", "length") and ev.completion_tokens >= 1
    finally:
        loop.stop()


def test_api_key_enforced_on_v1(server):
    for path, method, body in [("/v1/models", "GET", None), ("/v1/chat/completions", "POST", CHAT),
                               ("/v1/completions", "POST", {"model": "tiny", "prompt": "x", "max_tokens": 1})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "authentication_error"
        assert httpx.request(method, server.url + path, json=body, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    # checked before anything else: a bad body or an unknown /v1 route without the key is a 401 too
    assert httpx.post(server.url + "/v1/chat/completions", content="{not json").status_code == 401
    assert httpx.get(server.url + "/v1/nothing").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    # /metrics needs the key too (load and traffic are the operator's business)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and "moonlet_requests_total" in r.text
    # the page, the docs and health (liveness probes) are open (the page asks for the key)
    for path in ("/", "/health", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_public_metrics_opts_out_of_the_key_for_metrics_only(ref_engine):
    with LiveServer(ref_engine, api_key=KEY, max_batch=1, max_queue=0, public_metrics=True) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers=AUTH).status_code == 200


def test_health_metrics_page_openapi(server, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("requests_total", "generation_tokens_total", "generation_tokens_per_second", "queue_length",
                 "running_requests", "cache_usage", "prompt_tokens_total", "time_to_first_token_seconds_count"):
        assert f"# TYPE moonlet_{name.removesuffix('_count')}" in text, name
    assert 'moonlet_requests_total{route="/v1/completions",status="200"}' in text
    assert _metric(server.url, "moonlet_generation_tokens_total") > 0
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    assert "ChatCompletionRequest" in spec["components"]["schemas"]
    page = httpx.get(server.url + "/")
    assert page.headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page.text


# ---------------------------------------------------------------------------------------------
# moonlet eval through the server == moonlet eval on the engine


def test_eval_through_server_matches_engine_backend(server, ref_engine, tmp_path):
    from moonlet.eval import evaluate
    from moonlet.eval.backends import EngineBackend

    opts = dict(limit=4, arith_n=4, max_new_tokens=16, progress=False)
    a = evaluate(server.url, "arith", out=tmp_path / "api", api_key=KEY, **opts)
    b = evaluate(EngineBackend(ref_engine, name="engine"), "arith", out=tmp_path / "engine", **opts)

    def rows(d):
        return {(r["id"], r["sample"]): r["completion"] for r in map(json.loads, (d / "items.jsonl").open())}

    assert rows(tmp_path / "api") == rows(tmp_path / "engine")
    assert len(rows(tmp_path / "api")) == 4
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]


def test_shutdown_ends_requests_that_outlive_the_grace_period_cleanly(ref_engine):
    """Past the grace period a stream ends with an error event and [DONE], a plain request with a
    503, and new requests are refused meanwhile (what SIGTERM triggers: Server.stop is its body)."""
    srv = LiveServer(ref_engine, max_batch=2, max_queue=2, graceful_timeout=1.0).__enter__()
    try:
        long = {"model": "tiny", "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
        out: dict = {}

        def plain():
            out["plain"] = httpx.post(srv.url + "/v1/completions", json=long, timeout=60)

        t = threading.Thread(target=plain)
        with httpx.stream("POST", srv.url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            t.start()
            assert _wait_for(lambda: _metric(srv.url, "moonlet_running_requests") == 2)
            srv.server.stop()
            try:  # draining: a new request is refused (503, or the socket is closed already, before
                # or after the connection was accepted: uvicorn closes connections it has not answered)
                assert httpx.post(srv.url + "/v1/completions", json=long, timeout=10).status_code == 503
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                pass
            events = [json.loads(first[6:])] + _sse(lines)
        t.join(30)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events[-2:]
        assert out["plain"].status_code == 503 and out["plain"].json()["error"]["code"] == "shutting_down"
    finally:
        srv.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# graceful shutdown of the real command


@pytest.mark.slow
def test_sigterm_lets_inflight_requests_finish(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("MOONLET_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "moonlet", "serve", str(ckpt), "--port", str(port),
                             "--model-name", "tiny", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: _up(url) or proc.poll() is not None, timeout=180) and proc.poll() is None
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(first[6:])] + _sse(lines)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-2]["usage"]["completion_tokens"] == 60
        assert not _up(url)  # no new work after SIGTERM (connection refused, or 503 while draining)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
