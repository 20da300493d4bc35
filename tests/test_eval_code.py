"""Code grading on the bundled sets: reference solutions pass, broken ones fail, in the sandbox.

The full 164-problem HumanEval check is the recorded command
    moonlet eval oracle --task code --data humaneval --out /tmp/he-oracle      (-> 100.0%)
here a fixed stride-10 subset (17 problems) keeps the suite fast."""

import json

import pytest

from moonlet.eval.code_grader import (extract_code, grade_code, humaneval_program, reference_completion,
                                      truncate_at_stops)
from moonlet.eval.sandbox import Limits, Sandbox
from moonlet.eval.tasks import TaskFormatError, load_code

LIMITS = Limits(timeout=10.0)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def humaneval():
    return load_code("humaneval")


def rate(sandbox, items, completions):
    res = sandbox.run_many([lambda s, it=it, c=c: grade_code(it, c, s) for it, c in zip(items, completions)],
                           workers=2)
    return sum(r.passed for r in res) / len(res), res


def test_humaneval_bundle_is_complete(humaneval):
    assert len(humaneval) == 164
    assert len({it.id for it in humaneval}) == 164
    assert all(it.style == "humaneval" and it.entry_point and it.reference for it in humaneval)


def test_humaneval_reference_100_broken_0(sandbox, humaneval):
    subset = humaneval[::10]
    ok, res = rate(sandbox, subset, [reference_completion(it) for it in subset])
    assert ok == 1.0, [(it.id, r.reason) for it, r in zip(subset, res) if not r.passed]
    ok, res = rate(sandbox, subset, ["    return None\n" for _ in subset])
    assert ok == 0.0, [it.id for it, r in zip(subset, res) if r.passed]
    # another problem's (valid, running) solution is wrong here
    shifted = [reference_completion(b) for b in subset[1:] + subset[:1]]
    ok, _ = rate(sandbox, subset, shifted)
    assert ok == 0.0


def test_chat_style_whole_function_completion(sandbox, humaneval):
    it = humaneval[0]
    body = reference_completion(it)
    chat = f"Here you go:\n```python\nfrom typing import List\n\ndef {it.entry_point}(numbers: List[float], " \
           f"threshold: float) -> bool:\n{body}```\nThis checks all pairs."
    prog = humaneval_program(it, chat)
    assert prog.count(f"def {it.entry_point}") == 2  # the prompt's stub, then the model's function
    assert grade_code(it, chat, sandbox).passed
    # continuation with trailing junk is cut at the usual stop strings
    assert grade_code(it, body + "\n\nprint('trailing')\ndef other():\n    pass\n", sandbox).passed


def test_stdio_sample_reference_100_broken_0(sandbox):
    items = load_code("code-stdio-sample")
    assert len(items) >= 8 and all(it.style == "stdio" for it in items)
    ok, res = rate(sandbox, items, [reference_completion(it) for it in items])
    assert ok == 1.0, [(it.id, r.reason) for it, r in zip(items, res) if not r.passed]
    ok, _ = rate(sandbox, items, ["```python\nprint(input())\n```" for _ in items])
    assert ok == 0.0


def test_extract_code():
    assert extract_code("no fences") is None
    assert extract_code("```python\nprint(1)\n```") == "print(1)\n"
    two = "```python\nx = 1\n```\ntext\n```py\ndef solve():\n    return 2\n```"
    assert extract_code(two, "solve").startswith("def solve")
    assert extract_code(two) == "def solve():\n    return 2\n"  # longest block
    assert extract_code("```python\nprint(2)\n") == "print(2)\n"  # unclosed last fence
    assert truncate_at_stops("a\nb\ndef c", ["\ndef ", "\nclass "]) == "a\nb"


def test_livecodebench_rows_and_format_errors(tmp_path):
    lcb = {"question_id": "abc001_a", "question_content": "Print A+B.",
           "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
           "private_test_cases": json.dumps([{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}])}
    f = tmp_path / "lcb.jsonl"
    f.write_text(json.dumps(lcb) + "\n")
    (item,) = load_code(f)
    assert item.id == "abc001_a" and item.style == "stdio" and len(item.tests) == 2
    bad = {"prompt": "p", "tests": [{"input": "1", "output": "2", "testtype": "functional"}]}
    f.write_text(json.dumps(bad) + "\n")
    with pytest.raises(TaskFormatError, match="functional"):
        load_code(f)
    f.write_text('{"prompt": "p", "test": "def check(c): pass"}\n')
    with pytest.raises(TaskFormatError, match="entry_point"):
        load_code(f)
    f.write_text('{"prompt": "p"}\nnot json\n')
    with pytest.raises(TaskFormatError, match="line 2"):
        load_code(f)
