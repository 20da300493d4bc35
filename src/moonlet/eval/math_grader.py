"""Math answer grading: pull the final answer out of a completion, normalize it, decide equivalence.

Three steps, each usable on its own:
  extract_answer(text)  -> the last `\\boxed{...}` (nested braces), else "the answer is ...", else the
                           last number; with the method used, so reports can say why nothing was found.
  normalize(answer)     -> a canonical string: LaTeX spacing, \\left/\\right, \\dfrac, units, degrees,
                           dollar signs, percent, thousands separators, "x = ..." prefixes dropped.
  is_equiv(pred, gold)  -> structural comparison (tuples, intervals, sets, lists, matrices) down to
                           scalars, which are compared as strings, then as numbers, then with sympy.

Why a hand-written LaTeX converter instead of sympy's `parse_latex`: that needs antlr4 pinned to one
exact version (or lark), is slow to import, and still chokes on the forms that matter here
(`\\frac12`, `2\\sqrt3`, `\\dfrac`). Answers in MATH-style data use a small vocabulary, which
`latex_to_sympy` converts to a Python expression checked against a whitelist before sympy parses it
(sympy's parser calls `eval`, and model output is untrusted).

Every sympy comparison runs under a time limit (`timeout` seconds): on expiry the pair is graded
"not equivalent" with reason "timeout". Huge powers/factorials are refused before evaluation, since
big-integer arithmetic cannot be interrupted.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

# relative tolerance when one side is a decimal literal (0.3333 vs \frac13); exact answers compare exactly
DEFAULT_REL_TOL = 1e-4
DEFAULT_TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------------
# extraction


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    method: str  # "boxed" | "answer_is" | "last_number" | "none"


def _read_braced(text: str, start: int) -> tuple[str, int] | None:
    """`text[start] == "{"`: return (content, index after the matching brace); `\\{`/`\\}` are literal."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces kept), or `\\boxed 5`."""
    best = -1
    for cmd in ("\\boxed", "\\fbox"):
        best = max(best, text.rfind(cmd))
    if best < 0:
        return None
    i = best + (len("\\boxed") if text.startswith("\\boxed", best) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        got = _read_braced(text, i)
        return got[0] if got else None
    m = re.match(r"[^\s$]+", text[i:])  # "\boxed 5" form
    return m.group(0) if m else None


_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if any(ch.isdigit() for ch in s):
            out.append(s)
    return out


def extract_answer(text: str | None) -> Extraction:
    """The final answer of a solution: last \\boxed{}, else "the answer is X", else the last number."""
    if not text:
        return Extraction(None, "none")
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return Extraction(boxed.strip(), "boxed")
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        ans = matches[-1].group(1).strip().splitlines()[0].strip()
        inline = re.search(r"\$([^$]+)\$", ans)  # "the answer is $\frac{1}{2}$."
        if inline:
            ans = inline.group(1)
        ans = re.sub(r"[.\s]+$", "", ans) if not re.search(r"\d\.$", ans) or ans.endswith("..") else ans.rstrip(".")
        ans = ans.strip().strip("*").strip()
        if ans:
            return Extraction(ans, "answer_is")
    nums = _numbers(text)
    if nums:
        return Extraction(nums[-1], "last_number")
    return Extraction(None, "none")


# ---------------------------------------------------------------------------------------------
# normalization

_UNIT_WORDS = (
    "units?|square units?|sq units?|cubic units?|cm|centimeters?|centimetres?|mm|millimeters?|km|kilometers?|"
    "meters?|metres?|inches|inch|in|feet|foot|ft|yards?|yd|miles?|mph|kg|kilograms?|grams?|g|pounds?|lbs?|"
    "ounces?|oz|liters?|litres?|ml|gallons?|seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|"
    "years?|dollars?|cents?|degrees?|radians?|points?|people|students?|cookies?|marbles?|apples?|ways|times|"
    "percent|sq|cubic|square"
)
_TRAILING_UNIT = re.compile(rf"(?<=[\d}})])\s*(?:{_UNIT_WORDS})(?:\^?\{{?[23]\}}?)?\s*$", re.IGNORECASE)
_TEXT_CMDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\textrm", "\\operatorname")


@dataclass(frozen=True)
class Normalized:
    text: str
    percent: bool  # a % sign was removed: 50% may also mean 0.5


def _unwrap_text_commands(s: str) -> str:
    """`\\text{ cm}` -> ` cm`; a unit-only \\text after a number is dropped by the unit rule later."""
    for cmd in _TEXT_CMDS:
        while True:
            i = s.find(cmd + "{")
            if i < 0:
                break
            got = _read_braced(s, i + len(cmd))
            if got is None:
                break
            content, end = got
            s = s[:i] + content + s[end:]
    return s


def _fix_fracs_and_sqrts(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1b` -> `\\frac{1}{b}`, `\\sqrt3` -> `\\sqrt{3}`."""
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i) and not s[i + 5:i + 6].isalpha():
            out.append("\\frac")
            i += 5
            for _ in range(2):
                while i < len(s) and s[i] == " ":
                    i += 1
                if i < len(s) and s[i] == "{":
                    got = _read_braced(s, i)
                    if got is None:
                        break
                    out.append("{" + got[0] + "}")
                    i = got[1]
                elif i < len(s) and s[i] == "\\":
                    m = re.match(r"\\[a-zA-Z]+", s[i:])
                    out.append("{" + m.group(0) + "}")
                    i += len(m.group(0))
                elif i < len(s):
                    out.append("{" + s[i] + "}")
                    i += 1
            continue
        out.append(s[i])
        i += 1
    return "".join(out)


def normalize(answer: str) -> Normalized:
    """Canonical string form of an answer (see module docstring). Comparison-safe, not display-safe."""
    s = str(answer).strip()
    s = s.replace("\n", " ")
    s = re.sub(r"\\(?:displaystyle|textstyle)", "", s)
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\q?quad", " ", s)
    s = s.replace("~", " ")
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # degrees
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    # money
    s = s.replace("\\$", "").replace("$", "")
    # percent
    percent = bool(re.search(r"\\?%|\\percent", s))
    s = re.sub(r"\\?%|\\percent", "", s)
    # \text{...} and friends
    s = _unwrap_text_commands(s)
    s = s.replace("\\{", "\x01").replace("\\}", "\x02")  # protect set braces during unit/space work
    # trailing units (only after something numeric)
    for _ in range(3):
        new = _TRAILING_UNIT.sub("", s).rstrip()
        if new == s:
            break
        s = new
    # "x = 5", "k \in [1,2]" -> right-hand side (a single assignment to a short name)
    m = re.match(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(.+)$", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = s.replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    # thousands separators: only a lone number in 3-digit groups
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.replace(" ", "")):
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"(?<=\d)\\?\s(?=\d{3}\b)", "", s) if re.fullmatch(r"\d{1,3}(?:\s\d{3})+", s) else s
    s = _fix_fracs_and_sqrts(s)
    s = s.replace(" ", "")
    s = re.sub(r"(?<![\d\w}])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"^\+", "", s)
    s = re.sub(r"\\infinity|infinity|\\inf(?!ty)", "\\\\infty", s)
    # "(C)" / "\text{(C)}" -> "C" (multiple-choice letters)
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)
    if m:
        s = m.group(1)
    s = s.replace("\x01", "\\{").replace("\x02", "\\}")
    return Normalized(s, percent)


# ---------------------------------------------------------------------------------------------
# structure: split answers into comparable parts


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside (), [], {} and \\{ \\}."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i:i + 2])
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth < 0:
            return False
    return depth == 0


def _bracketed(s: str) -> tuple[str, list[str], str] | None:
    """`(a,b]` -> ("(", ["a","b"], "]") when the outer brackets enclose the whole string and it has a comma."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced(s[1:-1]):
        parts = _split_top_level(s[1:-1])
        if len(parts) >= 2:
            return s[0], parts, s[-1]
    return None


def _set_elements(s: str) -> list[str] | None:
    if s.startswith("\\{") and s.endswith("\\}"):
        return [p for p in _split_top_level(s[2:-2])]
    return None


def _matrix_rows(s: str) -> list[list[str]] | None:
    m = re.fullmatch(r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}", s)
    if not m:
        return None
    rows = [r for r in m.group(1).split("\\\\") if r != ""]
    return [r.split("&") for r in rows]


# ---------------------------------------------------------------------------------------------
# LaTeX -> sympy

_FUNCS = {
    "sqrt", "pi", "oo", "I", "E", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
    "sinh", "cosh", "tanh", "log", "exp", "Abs", "factorial", "binomial",
}
_LATEX_WORDS = {
    "\\pi": " pi ", "\\infty": " oo ", "\\cdot": "*", "\\times": "*", "\\ast": "*", "\\div": "/",
    "\\sin": " sin", "\\cos": " cos", "\\tan": " tan", "\\cot": " cot", "\\sec": " sec", "\\csc": " csc",
    "\\arcsin": " asin", "\\arccos": " acos", "\\arctan": " atan", "\\ln": " log", "\\log": " log",
    "\\exp": " exp", "\\sinh": " sinh", "\\cosh": " cosh", "\\tanh": " tanh",
}


def _convert_groups(s: str) -> str:
    """\\frac{a}{b}, \\sqrt[n]{x}, \\sqrt{x}, \\binom{n}{k}, ^{...}, _{...} -> Python-ish syntax."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac{", i) or s.startswith("\\binom{", i):
            name = "frac" if s.startswith("\\frac", i) else "binom"
            j = i + len(name) + 1
            a = _read_braced(s, j)
            b = _read_braced(s, a[1]) if a and a[1] < len(s) and s[a[1]] == "{" else None
            if not (a and b):
                raise ValueError("bad " + name)
            x, y = _convert_groups(a[0]), _convert_groups(b[0])
            out.append(f"(({x})/({y}))" if name == "frac" else f"binomial({x},{y})")
            i = b[1]
        elif s.startswith("\\sqrt[", i):
            j = s.index("]", i)
            n = _convert_groups(s[i + 6:j])
            a = _read_braced(s, j + 1) if j + 1 < len(s) and s[j + 1] == "{" else None
            if not a:
                raise ValueError("bad root")
            out.append(f"(({_convert_groups(a[0])})**(1/({n})))")
            i = a[1]
        elif s.startswith("\\sqrt{", i):
            a = _read_braced(s, i + 5)
            if not a:
                raise ValueError("bad sqrt")
            out.append(f"sqrt({_convert_groups(a[0])})")
            i = a[1]
        elif s[i] == "^":
            if i + 1 < len(s) and s[i + 1] == "{":
                a = _read_braced(s, i + 1)
                if not a:
                    raise ValueError("bad power")
                out.append(f"**({_convert_groups(a[0])})")
                i = a[1]
            else:
                out.append("**")
                i += 1
        elif s[i] == "_":
            # subscript: part of a symbol name (a_1, x_{10})
            if i + 1 < len(s) and s[i + 1] == "{":
                a = _read_braced(s, i + 1)
                if not a or not re.fullmatch(r"\w+", a[0]):
                    raise ValueError("bad subscript")
                out.append("_" + a[0])
                i = a[1]
            else:
                out.append("_")
                i += 1
        elif s[i] == "{":
            out.append("(")
            i += 1
        elif s[i] == "}":
            out.append(")")
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def latex_to_python(s: str) -> str | None:
    """A whitelisted Python/sympy expression string for a normalized LaTeX answer, or None."""
    s = s.replace("\\left", "").replace("\\right", "")
    # \log_{b}{x}, \log_b x, \log_2(8) -> log(x, b)
    s = re.sub(r"\\log_\{?(\w+)\}?\s*(?:\{([^{}]+)\}|\(([^()]+)\)|(\w+))",
               lambda m: f"log({m.group(2) or m.group(3) or m.group(4)},{m.group(1)})", s)
    for k in sorted(_LATEX_WORDS, key=len, reverse=True):
        s = re.sub(re.escape(k) + r"(?![a-zA-Z])", _LATEX_WORDS[k], s)
    try:
        s = _convert_groups(s)
    except (ValueError, IndexError):
        return None
    s = s.replace("\\", " \\")  # anything left is an unknown command: rejected below
    if "\\" in s or "__" in s or "=" in s or "<" in s or ">" in s:
        return None
    if re.search(r"\.(?!\d)", s) or re.search(r"[^0-9A-Za-z_+\-*/().,!\s]", s):
        return None
    for ident in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s):
        if ident in _FUNCS:
            continue
        if not re.fullmatch(r"[A-Za-z]+(?:_[A-Za-z0-9]+)?", ident) or len(ident.split("_")[0]) > 6:
            return None
    # the imaginary unit of MATH answers: "3+4i" (a lone i, not part of a longer name)
    s = re.sub(r"(?<![A-Za-z_])i(?![A-Za-z_0-9])", "I", s)
    s = re.sub(r"(?<![A-Za-z_])e(?=\s*\*\*)", "E", s)  # e^{x}: Euler's number
    return s.strip()


def _check_size(expr: Any) -> None:
    """Refuse expressions whose evaluation could run for minutes inside uninterruptible C code."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_Number and abs(float(node.exp)) > 10_000:
            raise ValueError("exponent too large")
        if isinstance(node, sympy.Pow) and isinstance(node.exp, sympy.Pow):
            raise ValueError("tower of powers")
        if isinstance(node, sympy.factorial) and node.args[0].is_Number and abs(float(node.args[0])) > 2_000:
            raise ValueError("factorial too large")


@functools.lru_cache(maxsize=1)
def _sympy_namespace() -> dict[str, Any]:
    """sympy's namespace, built once, and sympy's lazily imported parts loaded up front: a timeout
    that fires in the middle of a first-time import would leave a half-initialized module behind."""
    import sympy

    ns: dict[str, Any] = {}
    exec("from sympy import *", ns)  # noqa: S102  (fixed string: sympy's own namespace)
    x = sympy.Symbol("x")
    sympy.simplify(sympy.sqrt(8) * x / (x + 1) - sympy.sin(x) ** 2 - sympy.cos(x) ** 2)
    complex(sympy.N(sympy.pi * sympy.I + sympy.log(3, 2), 30))
    sympy.parsing.sympy_parser.parse_expr("2x", transformations="all")
    return ns


def to_sympy(answer: str) -> Any | None:
    """sympy expression of a normalized answer, or None when it is not a (safe) math expression."""
    py = latex_to_python(answer)
    if not py:
        return None
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor, factorial_notation, implicit_multiplication_application, parse_expr,
        standard_transformations,
    )

    trans = standard_transformations + (implicit_multiplication_application, convert_xor, factorial_notation)
    ns = dict(_sympy_namespace())
    try:
        raw = parse_expr(py, global_dict=ns, transformations=trans, evaluate=False)
        _check_size(raw)
        return parse_expr(py, global_dict=ns, transformations=trans, evaluate=True)
    except Exception:  # noqa: BLE001  (any parse failure means "not an expression")
        return None
    finally:
        del sympy


# ---------------------------------------------------------------------------------------------
# time limits


class GradingTimeout(BaseException):
    """BaseException so that broad `except Exception` around sympy calls cannot swallow it."""


def call_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """Run fn; raise GradingTimeout after `seconds`. SIGALRM in the main thread (interrupts sympy's
    Python loops); elsewhere a worker thread that is abandoned on expiry (it cannot be killed)."""
    if seconds is None or seconds <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise GradingTimeout()

        old = signal.signal(signal.SIGALRM, on_alarm)
        prev = signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if prev[0] > 0:  # an outer timer was running: re-arm it
                signal.setitimer(signal.ITIMER_REAL, prev[0])
    box: dict[str, Any] = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise GradingTimeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------------
# equivalence


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # "exact", "numeric", "symbolic", "structure", "mismatch", "timeout", "no answer", ...


def _simple_number(s: str) -> Fraction | float | None:
    """Fast path without sympy: integers, decimals, a/b, \\frac{a}{b} with integer parts."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(num, den) * (-1 if m.group(1) else 1)
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m:
        den = int(m.group(2))
        return None if den == 0 else Fraction(int(m.group(1)), den)
    if re.fullmatch(r"-?\d+", s):
        return Fraction(int(s))
    if re.fullmatch(r"-?\d*\.\d+(?:e-?\d+)?|-?\d+\.\d*(?:e-?\d+)?", s):
        return float(s)
    return None


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol * 1e-3)


def _has_decimal(s: str) -> bool:
    return bool(re.search(r"\d\.\d|(?<!\d)\.\d", s))


def _scalar_equiv(a: str, b: str, rel_tol: float, a_pct: bool, b_pct: bool) -> str | None:
    """Reason string if equal, else None. a/b are normalized scalars."""
    if a == b:
        return "exact"
    if a.lower() == b.lower() and not re.search(r"\d", a):
        return "exact"
    floaty = _has_decimal(a) or _has_decimal(b)
    scales = [Fraction(1)] + ([Fraction(1, 100), Fraction(100)] if (a_pct or b_pct) else [])
    x, y = _simple_number(a), _simple_number(b)
    if x is not None and y is not None:
        for sc in scales:
            if isinstance(x, Fraction) and isinstance(y, Fraction):
                if x * sc == y:
                    return "exact"
            elif _close(float(x) * float(sc), float(y), rel_tol):
                return "numeric"
        return None
    ea, eb = to_sympy(a), to_sympy(b)
    if ea is None or eb is None:
        return None
    return _sympy_equiv(ea, eb, floaty, rel_tol, a_pct or b_pct)


def _sympy_equiv(ea: Any, eb: Any, floaty: bool, rel_tol: float, pct: bool) -> str | None:
    import random

    import sympy

    free = sorted(ea.free_symbols | eb.free_symbols, key=str)
    if not free:
        try:
            va, vb = complex(sympy.N(ea, 30)), complex(sympy.N(eb, 30))
        except (TypeError, ValueError, ZeroDivisionError):
            va = vb = None
        if va is not None:
            if any(map(math.isinf, (va.real, vb.real))) or any(map(math.isnan, (va.real, va.imag, vb.real, vb.imag))):
                return "exact" if sympy.simplify(ea - eb) == 0 or ea == eb else None
            scales = [1.0] + ([0.01, 100.0] if pct else [])
            for sc in scales:
                tol = rel_tol if floaty or sc != 1.0 else 1e-12
                if abs(va * sc - vb) <= tol * max(1.0, abs(vb)):
                    if not floaty and sc == 1.0:
                        # exact forms: confirm symbolically when sympy can, numerics at 1e-12 otherwise
                        return "symbolic"
                    return "numeric"
            return None
    try:
        if sympy.simplify(ea - eb) == 0:
            return "symbolic"
    except Exception:  # noqa: BLE001
        pass
    # random-point test: equal functions agree everywhere; distinct ones almost never at 3 points
    rng = random.Random(0)
    agree = 0
    for _ in range(6):
        subs = {s: sympy.Rational(rng.randint(11, 97), rng.randint(7, 13)) for s in free}
        try:
            va, vb = complex(sympy.N(ea.subs(subs), 30)), complex(sympy.N(eb.subs(subs), 30))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if any(math.isnan(v) for v in (va.real, va.imag, vb.real, vb.imag)):
            continue
        tol = rel_tol if floaty else 1e-10
        if abs(va - vb) > tol * max(1.0, abs(vb)):
            return None
        agree += 1
        if agree >= 3:
            return "symbolic"
    return None


def _equiv(a: str, b: str, rel_tol: float, a_pct: bool, b_pct: bool) -> str | None:
    """Structural comparison; the reason if equivalent, else None."""
    if a == b:
        return "exact"
    ma, mb = _matrix_rows(a), _matrix_rows(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or len(ma) != len(mb) or any(len(r) != len(s) for r, s in zip(ma, mb)):
            return None
        ok = all(_equiv(x, y, rel_tol, a_pct, b_pct) for r, s in zip(ma, mb) for x, y in zip(r, s))
        return "structure" if ok else None
    # unions of intervals
    ua, ub = _split_top_level(a, "\\cup"), _split_top_level(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        if len(ua) != len(ub):
            return None
        return "structure" if all(_equiv(x, y, rel_tol, a_pct, b_pct) for x, y in zip(ua, ub)) else None
    # sets: unordered
    sa, sb = _set_elements(a), _set_elements(b)
    if sa is not None or sb is not None:
        sa = sa if sa is not None else _split_top_level(a)
        sb = sb if sb is not None else _split_top_level(b)
        return "structure" if _unordered_match(sa, sb, rel_tol, a_pct, b_pct) else None
    # tuples / intervals: ordered, brackets must agree
    ta, tb = _bracketed(a), _bracketed(b)
    if ta is not None or tb is not None:
        if ta is None or tb is None or ta[0] != tb[0] or ta[2] != tb[2] or len(ta[1]) != len(tb[1]):
            return None
        ok = all(_equiv(x, y, rel_tol, a_pct, b_pct) for x, y in zip(ta[1], tb[1]))
        return "structure" if ok else None
    # bare lists "1,2" (solutions): unordered
    la, lb = _split_top_level(a), _split_top_level(b)
    if len(la) > 1 or len(lb) > 1:
        return "structure" if _unordered_match(la, lb, rel_tol, a_pct, b_pct) else None
    # equations: compare sides
    if a.count("=") == 1 and b.count("=") == 1:
        (al, ar), (bl, br) = a.split("="), b.split("=")
        if _equiv(al, bl, rel_tol, a_pct, b_pct) and _equiv(ar, br, rel_tol, a_pct, b_pct):
            return "structure"
        return None
    return _scalar_equiv(a, b, rel_tol, a_pct, b_pct)


def _unordered_match(xs: list[str], ys: list[str], rel_tol: float, a_pct: bool, b_pct: bool) -> bool:
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        for j, y in enumerate(left):
            if _equiv(x, y, rel_tol, a_pct, b_pct):
                del left[j]
                break
        else:
            return False
    return True


def is_equiv(pred: str | None, gold: str | None, *, rel_tol: float = DEFAULT_REL_TOL,
             timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Whether two final answers are mathematically the same (see module docstring)."""
    if pred is None or not str(pred).strip():
        return Verdict(False, "no answer")
    if gold is None:
        raise ValueError("gold answer is missing")
    na, nb = normalize(str(pred)), normalize(str(gold))
    if na.text == nb.text:
        return Verdict(True, "exact")
    _sympy_namespace()  # warm up outside the time limit
    try:
        why = call_with_timeout(lambda: _equiv(na.text, nb.text, rel_tol, na.percent, nb.percent), timeout)
    except GradingTimeout:
        return Verdict(False, "timeout")
    except RecursionError:
        return Verdict(False, "too deeply nested")
    return Verdict(True, why) if why else Verdict(False, "mismatch")


@dataclass(frozen=True)
class MathGrade:
    extracted: str | None
    method: str
    correct: bool
    reason: str


def grade_completion(completion: str, gold: str, *, rel_tol: float = DEFAULT_REL_TOL,
                     timeout: float = DEFAULT_TIMEOUT) -> MathGrade:
    """Extract the final answer of a completion and compare it with the gold answer."""
    ex = extract_answer(completion)
    if ex.answer is None:
        return MathGrade(None, ex.method, False, "no answer found")
    v = is_equiv(ex.answer, gold, rel_tol=rel_tol, timeout=timeout)
    return MathGrade(ex.answer, ex.method, v.correct, v.reason)
