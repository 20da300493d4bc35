"""Math grading: extraction, normalization and equivalence on a hand-checked table."""

import json
import time
from pathlib import Path

import pytest

from moonlet.eval.math_grader import extract_answer, grade_completion, is_equiv, last_boxed, normalize
from moonlet.eval.tasks import BUILTIN, load_math

# (prediction, gold, equivalent?) -- each verdict decided by hand
PAIRS = [
    # fractions, decimals, \dfrac and shorthand
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac12", r"\frac{1}{2}", True),
    (r"\tfrac{3}{4}", "3/4", True),
    (r"-\frac{3}{4}", "-0.75", True),
    (".5", "0.5", True),
    ("0.3333", r"\frac13", True),  # decimal answers within 1e-4 relative
    ("0.33", r"\frac13", False),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"\frac{1}{3}", r"\frac{1}{2}", False),
    # integers are exact even when large
    ("10000", "10001", False),
    ("1,000", "1000", True),
    ("1{,}000,000", "1000000", True),
    ("12,345", "12345", True),
    # radicals and pi
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    (r"2\sqrt{3}", r"3\sqrt{2}", False),
    (r"\sqrt[3]{8}", "2", True),
    (r"25\pi", r"25 \pi", True),
    (r"2\pi", r"\pi", False),
    (r"\pi", "3.14159", True),
    # \left / \right, spacing, \! etc.
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    (r"\left[ -1, 4 \right]", "[-1,4]", True),
    (r"8\!\sqrt{2}", r"8\sqrt{2}", True),
    # units, degrees, money, percent
    (r"30^\circ", "30", True),
    (r"30^{\circ}", r"30", True),
    ("45°", "45", True),
    (r"10 \text{ cm}", "10", True),
    (r"12\text{ square units}", "12", True),
    (r"\$5.50", "5.5", True),
    ("5 dollars", "5", True),
    (r"50\%", "50", True),
    ("10%", "0.1", True),
    ("10%", "0.2", False),
    (r"\text{Monday}", "monday", True),
    (r"\text{(C)}", "C", True),
    ("(B)", "C", False),
    # assignments and equations
    ("x = 3", "3", True),
    ("y = 2x+3", "2x+3", True),
    ("k=4", "5", False),
    # intervals: brackets matter, order matters
    ("(2,3)", "(2, 3)", True),
    ("(1,2]", "[1,2]", False),
    (r"[4,\infty)", r"[4, \infty)", True),
    (r"(-\infty, 3]", r"(-\infty,3)", False),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty,1) \cup (2, \infty)", True),
    # tuples: ordered
    ("(2,1)", "(1,2)", False),
    (r"\left(\frac{1}{2}, -3\right)", "(0.5,-3)", True),
    # sets and solution lists: unordered
    (r"\{1,2\}", r"\{2,1\}", True),
    ("1, 2, 3", "3, 2, 1", True),
    ("1, 2", "1, 2, 3", False),
    # matrices / vectors
    (r"\begin{pmatrix} 17 \\ 39 \end{pmatrix}", r"\begin{pmatrix}17\\39\end{pmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    (r"\begin{bmatrix} 1 & 0 \\ 0 & 1 \end{bmatrix}", r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", True),
    # algebraic expressions (symbolic)
    ("2x+2", "2(x+1)", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "(x-1)(x+1)", False),
    (r"\frac{x^2-4}{x-2}", "x+2", True),
    (r"\sin^2 x + \cos^2 x", "1", True),
    # complex numbers, logs, factorials, powers
    ("3+4i", "4i+3", True),
    ("5 + i", "5+i", True),
    ("5 - i", "5+i", False),
    (r"\log_2 8", "3", True),
    ("5!", "120", True),
    ("2^{10}", "1024", True),
    ("e^{i\\pi}", "-1", True),
    # no answer
    (None, "3", False),
    ("", "3", False),
]


@pytest.mark.parametrize("pred,gold,expected", PAIRS, ids=[f"{i}" for i in range(len(PAIRS))])
def test_equivalence_table(pred, gold, expected):
    v = is_equiv(pred, gold)
    assert v.correct is expected, f"{pred!r} vs {gold!r}: {v}"


def test_table_is_large_and_balanced():
    assert len(PAIRS) >= 40
    assert sum(e for *_, e in PAIRS) >= 20 and sum(not e for *_, e in PAIRS) >= 15


@pytest.mark.parametrize("text,answer,method", [
    (r"so the result is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}", "boxed"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}", "boxed"),
    (r"first \boxed{1} then \boxed{\left(\frac{a}{b}, {c}\right)}", r"\left(\frac{a}{b}, {c}\right)", "boxed"),
    (r"\boxed 7", "7", "boxed"),
    (r"\fbox{42}", "42", "boxed"),
    ("The answer is $\\frac{3}{4}$.", r"\frac{3}{4}", "answer_is"),
    ("After all that, the final answer is 42.", "42", "answer_is"),
    ("Final Answer: 3.5", "3.5", "answer_is"),
    ("we get 12 apples and then 1,200 pears", "1,200", "last_number"),
    ("it is -0.25 overall", "-0.25", "last_number"),
    ("no digits at all", None, "none"),
    ("", None, "none"),
])
def test_extract_answer(text, answer, method):
    ex = extract_answer(text)
    assert (ex.answer, ex.method) == (answer, method)


def test_boxed_nested_braces_unbalanced_is_none():
    assert last_boxed(r"\boxed{\frac{1}{2}") is None


def test_normalize_forms():
    assert normalize(r"\left( 1,\! 2 \right)").text == "(1,2)"
    assert normalize(r"\dfrac{1}{2}").text == r"\frac{1}{2}"
    assert normalize("1,234,567").text == "1234567"
    assert normalize(r"50\%").percent and normalize(r"50\%").text == "50"
    assert normalize(r"90^\circ").text == "90"


def test_comparison_time_limit():
    t = time.monotonic()
    # this comparison takes ~0.5 s on the Zen 5 VM (it finished inside a 0.5 s limit there): a limit
    # 10x below that, so the test does not depend on the machine's speed
    v = is_equiv("(x+1)^{300}-(x+2)^{300}", "(x+3)^{300}-x^{300}", timeout=0.05)
    assert not v.correct and v.reason == "timeout"
    assert time.monotonic() - t < 3.0
    # huge powers are refused before evaluation (big-int arithmetic cannot be interrupted)
    t = time.monotonic()
    assert not is_equiv("9^{9^{9}}", "1").correct
    assert not is_equiv("x^{99999}", "x^{99999}+1").correct
    assert time.monotonic() - t < 3.0


def test_model_output_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    for pred in (f"__import__('os').system('touch {marker}')", f"open('{marker}','w')",
                 "().__class__.__base__.__subclasses__()"):
        assert not is_equiv(pred, "0").correct
    assert not marker.exists()


def test_grade_completion():
    g = grade_completion(r"... so $x = \boxed{\dfrac{19}{12}}$", r"\frac{19}{12}")
    assert g.correct and g.method == "boxed" and g.extracted == r"\dfrac{19}{12}"
    g = grade_completion("I do not know", "5")
    assert not g.correct and g.reason == "no answer found"


def test_bundled_math_sample():
    items = load_math()
    rows = [json.loads(line) for line in Path(BUILTIN["math-sample"]).read_text().splitlines()]
    assert len(items) == len(rows) >= 40
    assert {"problem", "solution", "answer", "subject", "level", "unique_id"} <= set(rows[0])
    assert len({r["subject"] for r in rows}) == 7 and len({r["level"] for r in rows}) >= 4
    for r in rows:  # each worked solution grades correct against its own answer
        assert grade_completion(r["solution"], r["answer"]).correct, r["unique_id"]
    # and wrong against a different answer
    wrong = 0
    for a, b in zip(rows, rows[1:] + rows[:1]):
        if normalize(a["answer"]).text != normalize(b["answer"]).text:
            assert not grade_completion(a["solution"], b["answer"]).correct, (a["unique_id"], b["answer"])
            wrong += 1
    assert wrong >= 40
