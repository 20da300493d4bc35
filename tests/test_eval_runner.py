"""The runner end to end with deterministic fake backends: outputs, metrics, resume, endpoints,
the engine contract, the naive decoder and the CLI."""

import json
import math
import sys
import types
from dataclasses import dataclass, field

import httpx
import pytest
import torch

from _eval_fixtures import make_checkpoint
from moonlet.cli import main
from moonlet.eval.backends import CallableBackend, GenParams, GenRequest, NaiveBackend, OpenAIBackend
from moonlet.eval.runner import EvalError, evaluate
from moonlet.eval.tasks import Prompt, load_code, load_math


def prompt_text(req: GenRequest) -> str:
    return req.prompt.text if req.prompt.messages is None else req.prompt.messages[-1][1]


def math_backend(items, right: set[str]):
    """Answers item i correctly iff its id is in `right` (wrong answer: 'the answer is 123456789')."""
    by_problem = {it.problem: it for it in items}

    def answer(req):
        text = prompt_text(req)
        it = next(v for k, v in by_problem.items() if k in text)
        return f"Working...\nSo the answer is $\\boxed{{{it.answer}}}$." if it.id in right else \
            "I think the answer is 123456789."
    return CallableBackend(answer, name="fake")


def test_math_outputs_and_metrics(tmp_path):
    items = load_math()[:12]
    right = {it.id for it in items[::2]}
    out = tmp_path / "math"
    s = evaluate(math_backend(items, right), "math", out=out, limit=12, progress=False)
    m = s["metrics"]
    assert m["n_items"] == 12 and m["accuracy"] == pytest.approx(0.5) and s["complete"]
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert {"id", "sample", "prompt", "completion", "extracted", "verdict", "reason"} <= set(r)
        assert (r["verdict"] == "pass") == (r["id"] in right)
        assert r["prompt"][0]["role"] == "user"  # chat prompt with the MATH instruction
        assert "\\boxed{}" in r["prompt"][0]["content"]
    wrong = next(r for r in rows if r["id"] not in right)
    assert wrong["extracted"] == "123456789" and wrong["method"] == "answer_is" and wrong["reason"] == "mismatch"
    assert set(m["by_subject"]) and sum(v["n"] for v in m["by_subject"].values()) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] == pytest.approx(0.5)
    md = (out / "report.md").read_text()
    assert "accuracy (pass@1) | 50.0%" in md and "By subject" in md and "report.png" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_skips_finished_items(tmp_path):
    items = load_math()[:10]
    right = {it.id for it in items[:7]}
    good = math_backend(items, right)
    calls = {"n": 0}

    def flaky(req):
        calls["n"] += 1
        if calls["n"] > 6:
            raise Crash("backend died")
        return good.fn(req)

    out = tmp_path / "run"
    with pytest.raises(Crash):
        evaluate(CallableBackend(flaky, name="fake"), "math", out=out, limit=10, batch_size=3, progress=False)
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 6  # two finished batches
    (out / "items.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:25])  # + a half-written line
    seen = []

    def counting(req):
        seen.append(prompt_text(req))
        return good.fn(req)
    s = evaluate(CallableBackend(counting, name="fake"), "math", out=out, limit=10, batch_size=3, progress=False)
    assert len(seen) == 4  # only the unfinished items were generated
    assert s["metrics"]["accuracy"] == pytest.approx(0.7) and s["complete"]
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(it.id for it in items)
    # a rerun of a complete run generates nothing
    seen.clear()
    evaluate(CallableBackend(counting, name="fake"), "math", out=out, limit=10, progress=False)
    assert seen == []
    # different settings are refused, --overwrite starts over
    with pytest.raises(EvalError, match="temperature"):
        evaluate(CallableBackend(counting, name="fake"), "math", out=out, limit=10, temperature=0.7, progress=False)
    s = evaluate(CallableBackend(counting, name="fake"), "math", out=out, limit=10, temperature=0.7,
                 overwrite=True, progress=False)
    assert s["metrics"]["n_rows"] == 10


def test_code_samples_give_unbiased_pass_at_k(tmp_path):
    items = load_code("humaneval")[:3]
    n_right = {items[0].prompt: 0, items[1].prompt: 2, items[2].prompt: 4}  # correct samples of 4
    refs = {it.prompt: it.reference for it in items}

    def sample(req):
        i = req.params.seed - 100  # sample index (seed = 100 + i)
        return refs[req.prompt.text] if i < n_right[req.prompt.text] else "    return None\n"
    s = evaluate(CallableBackend(sample, name="fake"), "code", data="humaneval", out=tmp_path / "he", limit=3,
                 samples=4, temperature=0.8, seed=100, progress=False)
    m = s["metrics"]
    closed = {k: sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in (0, 2, 4)) / 3 for k in (1, 2, 4)}
    assert m["accuracy"] == pytest.approx(closed[1]) == pytest.approx(0.5)
    assert m["pass_at_k"]["2"] == pytest.approx(closed[2]) and m["pass_at_k"]["4"] == pytest.approx(closed[4])
    assert "sandbox" in s and (tmp_path / "he" / "report.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "he" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all("def " in r["extracted"] and r["status"] in ("passed", "failed") for r in rows)


def test_arith_prompts_chat_and_raw(tmp_path):
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(2, 3), (10, 7), (40, 2), (5, 5)]))
    got = []

    def solve(req):
        got.append(req.prompt)
        a, b = [int(t.strip("?")) for t in prompt_text(req).split() if t.strip("?").isdigit()]
        return str(a + b) if a != 40 else "41"
    s = evaluate(CallableBackend(solve), "arith", data=data, progress=False)
    assert s["metrics"]["accuracy"] == pytest.approx(0.75)
    assert got[0].messages == (("user", "What is 2 + 3?"),)  # the bare problem, as in training
    got.clear()
    s = evaluate(CallableBackend(solve), "arith", data=data, chat=False, progress=False)
    assert got[0].text == "What is 2 + 3?\n" and s["metrics"]["accuracy"] == pytest.approx(0.75)


def test_openai_backend_over_http(tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "tiny", "object": "model", "created": 0, "owned_by": "moonlet"}]})
        body = json.loads(request.content)
        seen.append((request.url.path, body, request.headers.get("authorization")))
        if request.url.path.endswith("/chat/completions"):
            q = body["messages"][-1]["content"]
            return httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 0, "model": "tiny",
                                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                                 "role": "assistant", "content": f"= {eval(q.split('is')[1].strip('? '))}"}}]})
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 0, "model": "tiny",
                                         "choices": [{"index": 0, "text": " 5\n\nextra", "finish_reason": "stop",
                                                      "logprobs": None}]})

    backend = OpenAIBackend("http://fake:8000", api_key="sekret",
                            http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert backend.model == "tiny" and backend.base_url == "http://fake:8000/v1"
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n" +
                    json.dumps({"problem": "What is 4*4?", "answer": "17"}) + "\n")
    s = evaluate(backend, "arith", data=data, seed=7, progress=False)
    assert s["metrics"]["accuracy"] == pytest.approx(0.5)
    path, body, auth = seen[0]  # (requests run concurrently: any order)
    assert path == "/v1/chat/completions" and auth == "Bearer sekret"
    assert body["model"] == "tiny" and body["temperature"] == 0.0 and body["seed"] == 7 and body["max_tokens"] == 64
    seen.clear()
    s = evaluate(backend, "arith", data=data, chat=False, progress=False)
    path, body, _ = min(seen, key=lambda x: x[1]["prompt"])
    assert path == "/v1/completions" and body["prompt"] == "What is 2+3?\n" and body["stop"] == ["\n\n"]
    assert s["metrics"]["accuracy"] == pytest.approx(0.5)  # " 5\n\nextra" is cut at the stop string


# ---- the engine contract (moonlet.infer.engine is built in another area: a stand-in here) ------

@dataclass
class SamplingParams:  # the contract's fields
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple = ()
    stop: tuple = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class GenerationResult:
    token_ids: list
    text: str | None
    finish_reason: str
    prompt_tokens: int
    logprobs: list | None = None
    top_logprobs: list | None = None


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [7, 7] + [len(m["content"]) for m in messages]

    def decode(self, ids, skip_special=True):
        return " ".join(map(str, ids))


@dataclass
class FakeEngine:
    path: str
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    calls: list = field(default_factory=list)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **kw):
        FakeEngine.last = cls(str(path))
        return FakeEngine.last

    def generate(self, prompts, params, speculative=False):
        self.calls.append((prompts, params))
        return [GenerationResult([5], "5" if isinstance(p, str) else None, "stop", 3) for p in prompts]


def test_engine_backend_follows_the_contract(tmp_path, monkeypatch):
    mod = types.ModuleType("moonlet.infer.engine")
    mod.Engine, mod.SamplingParams, mod.GenerationResult = FakeEngine, SamplingParams, GenerationResult
    monkeypatch.setitem(sys.modules, "moonlet.infer", types.ModuleType("moonlet.infer"))
    monkeypatch.setitem(sys.modules, "moonlet.infer.engine", mod)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"problem": "2+3", "answer": "5"}) + "\n")
    s = evaluate(str(ckpt), "arith", data=data, samples=2, temperature=0.5, top_p=0.9, seed=3, progress=False)
    (prompts, params), = FakeEngine.last.calls
    assert prompts == [[7, 7, 3], [7, 7, 3]]  # chat template applied, token ids passed
    assert [p.seed for p in params] == [3, 4] and params[0].temperature == 0.5 and params[0].top_p == 0.9
    assert params[0].max_new_tokens == 64
    assert s["metrics"]["accuracy"] == 1.0  # text None -> tokenizer.decode([5]) == "5"
    evaluate(str(ckpt), "arith", data=data, chat=False, progress=False)
    (prompts, params), = FakeEngine.last.calls
    assert prompts == ["2+3\n"] and params[0].stop == ("\n\n",)


# ---- a real tiny checkpoint: naive decoding and the CLI -----------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("runner") / "ckpt", seed=1)


def test_naive_backend_is_greedy(ckpt):
    be = NaiveBackend.from_pretrained(ckpt)
    req = GenRequest(Prompt(text="The quick brown"), GenParams(max_new_tokens=4))
    prompt_ids, new_ids = be.generate_ids(req)
    assert prompt_ids == be.tokenizer.encode("The quick brown", add_bos=True) and prompt_ids[0] == 1
    assert 0 < len(new_ids) <= 4
    # teacher-forced check on one forward pass: each generated token is the argmax after its prefix
    with torch.no_grad():
        logits = be.model(torch.tensor([prompt_ids + new_ids])).logits[0]
    assert logits[len(prompt_ids) - 1:-1].argmax(-1).tolist() == new_ids
    if len(new_ids) < 4:  # it stopped: the next argmax is an end token
        assert int(logits[-1].argmax()) in be.stop_ids
    assert be.generate_ids(req) == (prompt_ids, new_ids)  # deterministic


def test_cli_end_to_end_and_errors(ckpt, tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"problem": "1 + 1 =", "answer": "2"}) + "\n" +
                    json.dumps({"problem": "2 + 2 =", "answer": "4"}) + "\n")
    out = tmp_path / "out"
    rc = main(["eval", str(ckpt), "--task", "arith", "--data", str(data), "--out", str(out), "--backend", "naive",
               "--raw", "--max-new-tokens", "2", "--no-progress"])
    assert rc == 0
    assert "arith: accuracy" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["metrics"]["n_items"] == 2
    assert (out / "report.md").exists()
    rc = main(["eval", "oracle", "--task", "math", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0 and "accuracy 100.0% (56 items)" in capsys.readouterr().out
    # bad input: one clear line, non-zero exit, nothing half-written
    assert main(["eval", str(tmp_path / "nope"), "--task", "math", "--out", str(tmp_path / "x")]) == 1
    assert "neither an existing checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    assert main(["eval", "oracle", "--task", "math", "--data", str(bad), "--out", str(tmp_path / "y")]) == 1
    assert "line 1" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["eval", "oracle", "--task", "code", "--samples", "2", "--k", "1,5", "--out", str(tmp_path / "z")]) == 1
    assert "pass@5 needs --samples >= 5" in capsys.readouterr().err
    assert main(["eval", "oracle", "--task", "ppl", "--out", str(tmp_path / "w")]) == 1
    assert main(["eval", "http://localhost:1", "--task", "ppl", "--data", str(data), "--out", str(tmp_path / "v")]) == 1
    assert "logits" in capsys.readouterr().err


def test_demo_api(ckpt, tmp_path):
    """What the training demo calls: arithmetic accuracy and validation perplexity."""
    from moonlet.eval import arith_accuracy, validation_perplexity

    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a} + {a} =", "answer": str(2 * a)}) + "\n" for a in range(4)))
    acc = arith_accuracy(CallableBackend(lambda r: "0" if "0 +" in prompt_text(r) else "7"), data=data)
    assert acc == pytest.approx(0.25)
    text = tmp_path / "val.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    m = validation_perplexity(str(ckpt), text, window=32)
    assert m["perplexity"] == pytest.approx(math.exp(m["nll_per_token"])) and m["bits_per_byte"] > 0
    assert m["stride"] == 16 and m["n_tokens"] > 0


def test_arith_reads_chat_jsonl_and_generated_sets(tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": "What is 4 + 5?"}, {"role": "assistant", "content": "4 + 5 = 9"}],
             "answer": "9", "task": "add", "level": 1},
            {"messages": [{"role": "user", "content": "Compute 7 - 2."}, {"role": "assistant", "content": "= 5"}],
             "answer": "5", "task": "sub", "level": 1}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def model(req):
        seen.append(req.prompt.messages)
        return "4 + 5 = 9" if "4 + 5" in prompt_text(req) else "7 - 2 = 4"
    s = evaluate(CallableBackend(model), "arith", data=data, progress=False)
    assert seen[0] == (("user", "What is 4 + 5?"),)  # the reference answer is not in the prompt
    assert s["metrics"]["accuracy"] == pytest.approx(0.5) and set(s["metrics"]["by_subject"]) == {"add", "sub"}

    # no data: the training area's generator (stand-in with its fields: prompt, answer, task, level)
    @dataclass(frozen=True)
    class Problem:
        task: str
        level: int
        prompt: str
        solution: str
        answer: str
    gen = types.ModuleType("moonlet.data.tasks")
    gen.generate = lambda n, seed=0: [Problem("add", 1, f"What is {i} + 1?", "", str(i + 1)) for i in range(n)]
    try:
        import moonlet.data as pkg
    except ImportError:
        pkg = types.ModuleType("moonlet.data")
        pkg.__path__ = []
        monkeypatch.setitem(sys.modules, "moonlet.data", pkg)
    monkeypatch.setitem(sys.modules, "moonlet.data.tasks", gen)
    monkeypatch.setattr(pkg, "tasks", gen, raising=False)

    def add_one(req):  # right on even operands only
        i = int(prompt_text(req).split()[2])
        return f"{i} + 1 = {i + 1}" if i % 2 == 0 else "0"
    s = evaluate(CallableBackend(add_one), "arith", arith_n=6, progress=False)
    assert s["metrics"]["n_items"] == 6 and s["metrics"]["accuracy"] == pytest.approx(0.5)
    assert "generated by moonlet.data.tasks" in s["data"]


def test_in_memory_model_generation(ckpt, tmp_path):
    import moonlet
    from moonlet.eval.backends import load_tokenizer

    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"problem": "1 + 1 =", "answer": "2"}) + "\n")
    s = evaluate(model=moonlet.from_pretrained(str(ckpt)), tokenizer=load_tokenizer(ckpt), task="arith", data=data,
                 chat=False, max_new_tokens=2, backend="naive", progress=False)
    assert s["target"] == "in-memory model" and s["metrics"]["n_rows"] == 1
