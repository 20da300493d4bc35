"""The evaluation runner: items -> prompts -> completions -> verdicts -> summary and report card.

    from moonlet.eval.runner import evaluate
    summary = evaluate("runs/demo", "arith", out="runs/demo/eval/arith")          # a checkpoint/run dir
    summary = evaluate("http://localhost:8000", "math", data="math-sample", out="eval/math", api_model="m")
    summary = evaluate(model=model, tokenizer=tok, task="ppl", data="val.txt")     # in-memory, no files

Output directory (`out`):
  run.json       what was evaluated and how; a rerun with different settings is refused
  items.jsonl    one row per (item, sample) [per window for ppl], appended as each is graded
  summary.json   metrics;  report.md + report.png: the report card (written atomically)
Resumable: rows already in items.jsonl are skipped on rerun (a half-written last line is dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from moonlet.config import atomic_write_text

from . import tasks as T
from .backends import (Backend, CallableBackend, EngineBackend, GenParams, GenRequest, NaiveBackend,
                       OpenAIBackend, load_tokenizer, resolve_checkpoint)
from .code_grader import grade_code, reference_completion, truncate_at_stops
from .math_grader import grade_completion, normalize
from .passk import default_ks, mean_pass_at_k
from .report import write_report
from .sandbox import Limits, Sandbox, describe_isolation

TASKS = ("math", "code", "arith", "ppl")
_MAX_NEW = {"math": 1024, "arith": 64, "code": 512}


@dataclass
class EvalOptions:
    samples: int = 1  # completions per item
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # default per task: math 1024, arith 64, code 512
    seed: int = 0  # sample i of an item uses seed + i
    chat: bool | None = None  # chat template vs raw prompt; default: raw for HumanEval, chat otherwise
    limit: int | None = None  # first N items only
    k: tuple[int, ...] | None = None  # pass@k values (default: 1, 2, 5, 10, ... up to samples)
    batch_size: int = 16  # prompts per backend call
    workers: int = 2  # parallel sandboxes
    timeout: float = 10.0  # sandbox wall clock per candidate (s)
    memory_mb: int = 1024  # sandbox address-space limit
    grade_timeout: float = 5.0  # per math comparison (s)
    window: int = 512  # ppl
    stride: int | None = None  # ppl (default window // 2)
    ppl_batch_size: int = 4
    arith_n: int = 200  # generated arith set when no data file
    arith_seed: int = 1234
    backend: str = "engine"  # local checkpoints: "engine" (moonlet.infer) or "naive"
    dtype: str | None = None  # local checkpoints: "float32" | "bfloat16" | ...

    # fields that define a run: a resume with other values would mix incomparable rows
    IDENTITY = ("samples", "temperature", "top_p", "max_new_tokens", "seed", "chat", "window", "stride",
                "arith_n", "arith_seed")


class EvalError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# results store


class ResultStore:
    """items.jsonl, appended row by row (flushed; fsync per batch); thread-safe."""

    def __init__(self, out: Path | None):
        self.out = out
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        self._f = None
        if out is None:
            return
        path = out / "items.jsonl"
        if path.exists():
            good, dropped = [], 0
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    dropped += 1  # a line cut by a crash
            if dropped:
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in good))
            self.rows = good
        self._f = open(path, "a", encoding="utf-8")

    def done_keys(self) -> set[tuple[str, int]]:
        return {(r["id"], int(r.get("sample", 0))) for r in self.rows}

    def add(self, row: dict) -> None:
        with self._lock:
            self.rows.append(row)
            if self._f:
                self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self._f.flush()

    def sync(self) -> None:
        with self._lock:
            if self._f:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f:
            self.sync()
            self._f.close()
            self._f = None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_out(out: Path, run: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if overwrite:
        for name in ("run.json", "items.jsonl", "summary.json", "report.md", "report.png"):
            (out / name).unlink(missing_ok=True)
    if run_file.exists():
        old = json.loads(run_file.read_text())
        keys = ("task", "data_sha256", "target", *EvalOptions.IDENTITY)
        diff = [k for k in keys if old.get(k) != run.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {run.get(k)!r}" for k in diff)
            raise EvalError(f"{out} holds a run with different settings ({detail}); "
                            "use another --out or --overwrite")
    atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# summary


def _group_counts(rows: list[dict]) -> dict[str, tuple[int, int]]:
    by: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by[r["id"]].append(r["verdict"] == "pass")
    return {i: (len(v), sum(v)) for i, v in by.items()}


def _reason_key(reason: str) -> str:
    r = (reason or "").strip()
    for prefix in ("wrong answer on test", "runtime error on test", "timeout on test"):
        if r.startswith(prefix):
            return prefix.replace(" on test", "")
    return r.split(" (line")[0][:80]


def summarize_generation(task: str, rows: list[dict], items: Sequence[Any], opts: EvalOptions) -> dict:
    ids = [it.id for it in items]
    rows = [r for r in rows if r["id"] in set(ids)]
    counts = _group_counts(rows)
    per_item = [counts[i] for i in ids if i in counts]
    m: dict[str, Any] = {"n_items": len(per_item), "n_rows": len(rows)}
    m["accuracy"] = mean_pass_at_k(per_item, 1) if per_item else None
    n_min = min((n for n, _ in per_item), default=0)
    ks = [k for k in (opts.k or default_ks(opts.samples)) if k <= n_min]
    m["pass_at_k"] = {str(k): mean_pass_at_k(per_item, k) for k in ks}
    fails = Counter(_reason_key(r.get("reason", "")) for r in rows if r["verdict"] != "pass")
    m["failure_reasons"] = dict(fails.most_common(12))
    if task in ("math", "arith"):
        m["no_answer_rate"] = sum(r.get("extracted") is None for r in rows) / max(1, len(rows))
        m["extraction"] = dict(Counter(r.get("method", "none") for r in rows))
        by_id = {it.id: it for it in items}
        for key, attr in (("by_subject", "subject"), ("by_level", "level")):
            groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for i in ids:
                if i in counts and getattr(by_id[i], attr, None) is not None:
                    groups[str(getattr(by_id[i], attr))].append(counts[i])
            if groups:
                m[key] = {g: {"n": len(v), "accuracy": mean_pass_at_k(v, 1)} for g, v in sorted(groups.items())}
        if opts.samples > 1:
            m["maj_at_n"] = _majority(rows, len(per_item))
    m["mean_completion_chars"] = sum(len(r.get("completion") or "") for r in rows) / max(1, len(rows))
    return m


def _majority(rows: list[dict], n_items: int) -> float:
    """maj@n: the most common extracted answer (normalized) of each item is graded."""
    votes: dict[str, Counter] = defaultdict(Counter)
    verdict: dict[tuple[str, str], bool] = {}
    for r in rows:
        if r.get("extracted") is None:
            continue
        key = normalize(r["extracted"]).text
        votes[r["id"]][key] += 1
        verdict[(r["id"], key)] = verdict.get((r["id"], key), False) or r["verdict"] == "pass"
    wins = sum(verdict[(i, c.most_common(1)[0][0])] for i, c in votes.items())
    return wins / max(1, n_items)


# ---------------------------------------------------------------------------------------------
# evaluate


def _is_url(s: Any) -> bool:
    return isinstance(s, str) and s.startswith(("http://", "https://"))


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise EvalError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return dt


def load_items(task: str, data: str | None, opts: EvalOptions) -> tuple[list, Path | None]:
    if task == "math":
        path = T.resolve_data(data, "math-sample")
        items = T.load_math(path)
    elif task == "code":
        path = T.resolve_data(data, "humaneval")
        items = T.load_code(path)
    elif task == "arith":
        path = T.resolve_data(data) if data is not None else None
        items = T.load_arith(path, n=opts.arith_n, seed=opts.arith_seed)
    else:
        raise EvalError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if opts.limit is not None:
        items = items[:opts.limit]
    return items, path


def _oracle(items: list, prompts: dict[str, T.Prompt], task: str) -> CallableBackend:
    """Answers every item with its reference solution: checks that a data set's tests and answers
    grade as correct (`moonlet eval oracle --task code --data FILE`)."""
    table = {}
    for it in items:
        if task == "code":
            table[prompts[it.id]] = reference_completion(it)
        else:
            table[prompts[it.id]] = f"The answer is $\\boxed{{{it.answer}}}$."
    return CallableBackend(lambda r: table[r.prompt], name="oracle")


def _make_backend(target: Any, opts: EvalOptions, api_model: str | None, api_key: str | None,
                  model: Any = None, tokenizer: Any = None) -> Backend:
    if target is None and model is not None:  # an in-memory model (e.g. right after training)
        if tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer (tokenizer=)")
        if opts.backend == "engine":
            try:
                from moonlet.infer.engine import Engine
            except ImportError:
                Engine = None
            if Engine is not None:
                return EngineBackend(Engine(model, tokenizer=tokenizer), tokenizer, name="in-memory model")
        return NaiveBackend(model, tokenizer, name="in-memory model")
    if hasattr(target, "generate") and not isinstance(target, (str, os.PathLike)):
        if hasattr(target, "name"):
            return target  # already a Backend
        return EngineBackend(target, name=type(target).__name__)  # an Engine instance
    if _is_url(target):
        return OpenAIBackend(str(target), model=api_model, api_key=api_key)
    if opts.backend == "naive":
        return NaiveBackend.from_pretrained(target, dtype=_dtype(opts.dtype))
    if opts.backend != "engine":
        raise EvalError(f"unknown backend {opts.backend!r} (engine, naive)")
    return EngineBackend.from_pretrained(resolve_checkpoint(target), dtype=_dtype(opts.dtype))


def evaluate(target: Any = None, task: str = "math", *, data: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None, options: EvalOptions | None = None,
             model: Any = None, tokenizer: Any = None, api_model: str | None = None, api_key: str | None = None,
             overwrite: bool = False, progress: bool = True, **kw: Any) -> dict:
    """Evaluate `target` on `task`; returns the summary (also written to `out` when given).

    target: a checkpoint or training-run dir, an http(s) URL of an OpenAI-compatible server, a Backend,
            an Engine, or "oracle" (each item's reference solution; checks a data set).
    task:   "math" | "arith" | "code" | "ppl".
    data:   a JSONL/text file or a built-in set (humaneval, math-sample, code-stdio-sample).
    model/tokenizer: an in-memory CausalLM + tokenizer instead of a target (skips loading; generation
            through moonlet's engine when available, else the naive decoder).
    kw:     any EvalOptions field (samples=, temperature=, limit=, ...).
    """
    opts = options or EvalOptions()
    bad = set(kw) - {f.name for f in fields(EvalOptions)}
    if bad:
        raise TypeError(f"unknown options: {', '.join(sorted(bad))}")
    for k, v in kw.items():
        setattr(opts, k, v)
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if opts.samples < 1:
        raise EvalError("--samples must be >= 1")
    if target is None and model is None:
        raise EvalError("nothing to evaluate: give a checkpoint, a URL, a backend or a model")
    out_dir = Path(out) if out is not None else None
    if task == "ppl":
        return _evaluate_ppl(target, data, out_dir, opts, model, tokenizer, overwrite, progress)
    return _evaluate_generation(target, task, data, out_dir, opts, api_model, api_key, overwrite, progress,
                                model, tokenizer)


def _target_name(target: Any) -> str:
    if target is None:
        return "in-memory model"
    if isinstance(target, (str, os.PathLike)):
        return str(target)
    return getattr(target, "name", type(target).__name__)


def _evaluate_generation(target, task, data, out, opts, api_model, api_key, overwrite, progress,
                         model=None, tokenizer=None) -> dict:
    items, data_path = load_items(task, data, opts)
    chat = opts.chat
    if chat is None:
        chat = not (task == "code" and all(it.style == "humaneval" for it in items))
    max_new = opts.max_new_tokens or _MAX_NEW[task]
    if task == "math":
        prompts = {it.id: T.math_prompt(it, chat) for it in items}
    elif task == "arith":
        prompts = {it.id: T.arith_prompt(it, chat) for it in items}
    else:
        prompts = {it.id: T.code_prompt(it, chat) for it in items}
    if data_path is None:
        data_label = f"generated by moonlet.data.tasks (n={opts.arith_n}, seed={opts.arith_seed})"
    elif data is None or str(data) in T.BUILTIN:
        data_label = f"{data or {'math': 'math-sample', 'code': 'humaneval'}[task]} (built-in)"
    else:
        data_label = str(data_path)
    run = {"task": task, "target": _target_name(target), "data": data_label,
           "data_sha256": _file_sha256(data_path) if data_path else f"generated:{opts.arith_n}:{opts.arith_seed}",
           **{k: getattr(opts, k) for k in EvalOptions.IDENTITY}, "chat": chat, "max_new_tokens": max_new,
           "limit": opts.limit, "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if out is not None:
        _prepare_out(out, run, overwrite)
    store = ResultStore(out)
    done = store.done_keys()
    pending = [(it, s) for it in items for s in range(opts.samples) if (it.id, s) not in done]
    if opts.samples > 1 and opts.temperature == 0:
        print("moonlet eval: warning: several samples at temperature 0 are identical", file=sys.stderr)

    sandbox = None
    if task == "code":
        sandbox = Sandbox(Limits(timeout=opts.timeout, memory_mb=opts.memory_mb, test_timeout=min(opts.timeout, 5.0)))
    bar = _progress(len(pending), f"eval {task}", progress)
    try:
        if pending:
            if target == "oracle":
                backend = _oracle(items, prompts, task)
            else:
                backend = _make_backend(target, opts, api_model, api_key, model, tokenizer)
            _run_pending(pending, prompts, backend, task, opts, max_new, store, sandbox, bar)
    finally:
        bar.close()
        store.close()
    metrics = summarize_generation(task, store.rows, items, opts)
    summary = {"task": task, "target": run["target"], "data": run["data"],
               "sampling": {"samples": opts.samples, "temperature": opts.temperature, "top_p": opts.top_p,
                            "max_new_tokens": max_new, "seed": opts.seed, "chat": chat},
               "metrics": metrics, "complete": metrics["n_rows"] >= len(items) * opts.samples,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if sandbox is not None:
        summary["sandbox"] = describe_isolation(sandbox.isolation)
    if out is not None:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_report(out, summary, [r for r in store.rows if r["id"] in {it.id for it in items}])
    return summary


def _run_pending(pending, prompts, backend, task, opts, max_new, store, sandbox, bar) -> None:
    pool = ThreadPoolExecutor(max_workers=max(1, opts.workers)) if sandbox is not None else None
    futures: list[Future] = []
    try:
        for start in range(0, len(pending), opts.batch_size):
            chunk = pending[start:start + opts.batch_size]
            reqs = [GenRequest(prompts[it.id], GenParams(max_new, opts.temperature, opts.top_p, opts.seed + s))
                    for it, s in chunk]
            completions = backend.generate(reqs)
            if len(completions) != len(reqs):
                raise EvalError(f"backend returned {len(completions)} completions for {len(reqs)} prompts")
            for (it, s), req, comp in zip(chunk, reqs, completions):
                comp = truncate_at_stops(comp or "", req.prompt.stop)
                base = {"id": it.id, "sample": s, "prompt": req.prompt.as_record(), "completion": comp}
                if pool is None:
                    g = grade_completion(comp, it.answer, timeout=opts.grade_timeout)
                    store.add({**base, "answer": it.answer, "extracted": g.extracted, "method": g.method,
                               "verdict": "pass" if g.correct else "fail", "reason": g.reason})
                    bar.update(1)
                else:
                    futures.append(pool.submit(_grade_code_row, it, comp, base, sandbox, store, bar))
            store.sync()
            running = []
            for f in futures:
                if f.done():
                    f.result()  # re-raise a grading crash now rather than at the end
                else:
                    running.append(f)
            futures = running
        for f in futures:
            f.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        store.sync()


def _grade_code_row(item, completion, base, sandbox, store, bar) -> None:
    from .code_grader import humaneval_program, stdio_program

    if item.style == "humaneval":  # the code that ran, without the task's tests
        program = humaneval_program(item, completion)
        program = program[:program.rfind(item.test)].rstrip() + "\n"
    else:
        program = stdio_program(completion)
    res = grade_code(item, completion, sandbox)
    store.add({**base, "extracted": program, "verdict": "pass" if res.passed else "fail", "reason": res.reason,
               "status": res.status, "duration": round(res.duration, 3), "tests_passed": res.tests_passed})
    bar.update(1)


# ---------------------------------------------------------------------------------------------
# perplexity


def _evaluate_ppl(target, data, out, opts, model, tokenizer, overwrite, progress) -> dict:
    from .perplexity import effective_stride, sliding_windows, tokenize_for_ppl, window_nll

    if data is None:
        raise EvalError("the ppl task needs --data TEXT_FILE")
    if _is_url(target):
        raise EvalError("perplexity needs the model's logits: give a local checkpoint, not a URL")
    data_path = Path(data)
    text = T.load_text(data_path)
    if model is None:
        import moonlet

        ckpt = resolve_checkpoint(target)
        model = moonlet.from_pretrained(str(ckpt), dtype=_dtype(opts.dtype))
        tokenizer = tokenizer or load_tokenizer(ckpt)
    if tokenizer is None:
        raise EvalError("perplexity needs a tokenizer (tokenizer.json in the checkpoint, or tokenizer=)")
    model.eval()
    stride = effective_stride(opts.window, opts.stride)
    run = {"task": "ppl", "target": _target_name(target), "data": str(data_path), "data_sha256": _file_sha256(data_path),
           **{k: getattr(opts, k) for k in EvalOptions.IDENTITY}, "stride": stride,
           "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if out is not None:
        _prepare_out(out, run, overwrite)
    store = ResultStore(out)
    ids, n_bytes = tokenize_for_ppl(text, tokenizer)
    windows = sliding_windows(len(ids), opts.window, stride)
    done = {r["id"] for r in store.rows}
    todo = [w for w in windows if f"window{w.index}" not in done]
    bar = _progress(len(todo), "eval ppl", progress)
    try:
        for i, (w, nll) in enumerate(window_nll(model, ids, todo, opts.ppl_batch_size)):
            store.add({"id": f"window{w.index}", "sample": 0, "begin": w.begin, "end": w.end,
                       "n_scored": w.n_scored, "nll_sum": nll, "verdict": "pass"})
            bar.update(1)
            if i % 16 == 15:
                store.sync()
    finally:
        bar.close()
        store.close()
    rows = [r for r in store.rows if r["id"].startswith("window")]
    nll_sum = sum(r["nll_sum"] for r in rows)
    n_tok = sum(r["n_scored"] for r in rows)
    import math

    metrics = {"nll_per_token": nll_sum / n_tok, "perplexity": math.exp(nll_sum / n_tok),
               "bits_per_byte": nll_sum / (math.log(2) * n_bytes), "bits_per_token": nll_sum / n_tok / math.log(2),
               "n_tokens": n_tok, "n_bytes": n_bytes, "window": opts.window, "stride": stride, "n_windows": len(rows)}
    summary = {"task": "ppl", "target": run["target"], "data": str(data_path), "metrics": metrics,
               "complete": len(rows) == len(windows), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if out is not None:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_report(out, summary, rows)
    return summary


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False)


def headline(summary: dict) -> str:
    """One line for logs and the CLI."""
    m = summary["metrics"]
    if summary["task"] == "ppl":
        return (f"ppl {m['perplexity']:.3f}  nll/token {m['nll_per_token']:.4f}  bits/byte {m['bits_per_byte']:.4f}"
                f"  ({m['n_tokens']} tokens)")
    parts = [f"accuracy {100 * (m['accuracy'] or 0):.1f}% ({m['n_items']} items)"]
    parts += [f"pass@{k} {100 * v:.1f}%" for k, v in m.get("pass_at_k", {}).items() if k != "1"]
    if "maj_at_n" in m:
        parts.append(f"maj@{summary['sampling']['samples']} {100 * m['maj_at_n']:.1f}%")
    return "  ".join(parts)
