"""From a model completion to a sandboxed verdict: pick the code out of the completion, assemble
the program with the task's tests, run it in the sandbox."""

from __future__ import annotations

import re

from .sandbox import Limits, Sandbox, SandboxResult
from .tasks import HUMANEVAL_STOPS, CodeItem

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str, entry_point: str | None = None) -> str | None:
    """The code of a fenced block (```python ... ```; an unclosed last fence counts): the block that
    defines `entry_point` if any, else the longest Python block. None when there is no fence."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return None
    py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
    if entry_point:
        defining = [b for b in py if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return defining[-1]
    return max(py, key=len)


def truncate_at_stops(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut at the earliest stop string (backends may not enforce all of them)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def humaneval_program(item: CodeItem, completion: str) -> str:
    """prompt + completion (+ tests). A completion holding the whole function (chat models) is put
    after the prompt, whose own definition it then replaces; a bare continuation is cut at the
    usual stop strings first."""
    code = extract_code(completion, item.entry_point)
    if code is None:
        defines = re.search(rf"^def\s+{re.escape(item.entry_point or '')}\s*\(", completion, re.MULTILINE)
        code = completion if defines else truncate_at_stops(completion, HUMANEVAL_STOPS)
        if not defines:
            return f"{item.prompt}{code}\n\n{item.test}\n\ncheck({item.entry_point})\n"
    return f"{item.prompt}\n    pass\n\n{code}\n\n{item.test}\n\ncheck({item.entry_point})\n"


def stdio_program(completion: str) -> str:
    code = extract_code(completion)
    return code if code is not None else completion


def grade_code(item: CodeItem, completion: str, sandbox: Sandbox, limits: Limits | None = None) -> SandboxResult:
    """Run one completion of one item in the sandbox."""
    if item.style == "humaneval":
        return sandbox.run_check(humaneval_program(item, completion), limits)
    return sandbox.run_stdio(stdio_program(completion), item.tests, limits)


def reference_completion(item: CodeItem) -> str:
    """The item's reference solution in the form a completion would take."""
    if item.reference is None:
        raise ValueError(f"item {item.id} has no reference solution")
    return item.reference if item.style == "humaneval" else f"```python\n{item.reference}\n```"
