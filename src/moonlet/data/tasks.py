"""Synthetic verifiable tasks: arithmetic and word problems with exact integer answers.

Every problem is a pure function of (seed, task, level, index), so a dataset is reproducible and
problem i does not depend on how many were asked for. Difficulty `level` (1..5) sets operand sizes
and the number of steps; level 1 (single digits, one operation) is what a few-M-parameter model
learns in minutes. Used for SFT (`Problem.messages`), evaluation (`check`) and later RL rewards.

    tasks:   add      What is 47 + 8?                      -> 47 + 8 = 55
             sub      Compute 52 - 19.                      -> 52 - 19 = 33
             mul      7 * 6 = ?                             -> 7 * 6 = 42
             expr     What is (3 + 4) * 2?                  -> (3 + 4) * 2 = 14
             word     Ann has 5 apples. She buys 3 more. How many apples does Ann have now?
                                                            -> 5 + 3 = 8. The answer is 8.

The checker reads the integer after the last "answer is", else after the last "=", else the last
integer in the text, and compares it with the exact answer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

TASKS = ("add", "sub", "mul", "expr", "word")
LEVELS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Problem:
    task: str
    level: int
    prompt: str  # the user's question
    solution: str  # a worked answer, ending in the result (what SFT teaches)
    answer: str  # the exact integer answer, as text

    def messages(self, with_solution: bool = True) -> list[dict]:
        msgs = [{"role": "user", "content": self.prompt}]
        if with_solution:
            msgs.append({"role": "assistant", "content": self.solution})
        return msgs


# ---- generators: rng -> (prompt, solution, answer) ------------------------------------------------
def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


_ASK = ("What is {e}?", "Compute {e}.", "{e} = ?", "Calculate {e}.", "What does {e} equal?")


def _ask(rng: random.Random, expr: str) -> str:
    return rng.choice(_ASK).format(e=expr)


def _add(rng, level):
    a, b = _operand(rng, level), _operand(rng, rng.randint(1, level))
    if rng.random() < 0.5:
        a, b = b, a
    e = f"{a} + {b}"
    return _ask(rng, e), f"{e} = {a + b}", a + b


def _sub(rng, level):
    a, b = _operand(rng, level), _operand(rng, rng.randint(1, level))
    if level < 3 and b > a:  # no negative results at the easy end
        a, b = b, a
    e = f"{a} - {b}"
    return _ask(rng, e), f"{e} = {a - b}", a - b


def _mul(rng, level):
    da, db = [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)][level - 1]
    a, b = _operand(rng, da), _operand(rng, db)
    if rng.random() < 0.5:
        a, b = b, a
    e = f"{a} * {b}"
    return _ask(rng, e), f"{e} = {a * b}", a * b


def _expr(rng, level):
    """level + 1 operands, + - *, parentheses from level 3; small operands so it is about structure."""
    n = level + 1
    digits = 1 if level < 4 else 2
    expr = str(_operand(rng, digits))
    for _ in range(n - 1):
        op = rng.choice("+-*")
        rhs = str(_operand(rng, 1 if op == "*" else digits))
        if level >= 3 and " " in expr and rng.random() < 0.4:
            expr = f"({expr})"
        expr = f"{expr} {op} {rhs}"
    value = _eval(expr)
    return _ask(rng, expr), f"{expr} = {value}", value


_NAMES = ("Ann", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jo", "Kit", "Lena", "Max", "Nora", "Omar",
          "Pia")
_PRONOUN = {"Ann": "She", "Ben": "He", "Cleo": "She", "Dan": "He", "Eva": "She", "Finn": "He", "Gus": "He",
            "Hana": "She", "Ivo": "He", "Jo": "She", "Kit": "She", "Lena": "She", "Max": "He", "Nora": "She",
            "Omar": "He", "Pia": "She"}
_ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles", "eggs", "stones")


def _word(rng, level):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    he = _PRONOUN[name]
    kind = rng.choice(("gain", "loss", "groups") if level >= 2 else ("gain", "loss"))
    digits = 1 if level <= 2 else 2
    if kind == "groups":
        a, b = rng.randint(2, 9), _operand(rng, digits) or 2
        text = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?"
        steps, value = [f"{a} * {b} = {a * b}"], a * b
    else:
        a = _operand(rng, digits)
        b = _operand(rng, digits)
        if kind == "loss" and b > a:
            a, b = b, a
        verb = f"buys {b} more" if kind == "gain" else f"gives away {b}"
        value = a + b if kind == "gain" else a - b
        text = f"{name} has {a} {item}. {he} {verb}."
        steps = [f"{a} {'+' if kind == 'gain' else '-'} {b} = {value}"]
    extra = max(0, level - 2) if kind != "groups" else max(0, level - 3)
    for _ in range(extra):  # more steps at higher levels
        c = _operand(rng, digits)
        if rng.random() < 0.5 or c > value:
            text += f" Then {he.lower()} finds {c} more."
            steps.append(f"{value} + {c} = {value + c}")
            value += c
        else:
            text += f" Then {he.lower()} loses {c}."
            steps.append(f"{value} - {c} = {value - c}")
            value -= c
    if kind != "groups":
        text += f" How many {item} does {name} have now?"
    return text, ". ".join(steps) + f". The answer is {value}.", value


_GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "expr": _expr, "word": _word}


def _eval(expr: str) -> int:
    """Integer value of an expression of ints, + - * and parentheses (no eval())."""
    tokens = re.findall(r"\d+|[-+*()]", expr)
    pos = 0

    def atom() -> int:
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "(":
            v = add()
            pos += 1  # ")"
            return v
        return int(t)

    def mul() -> int:
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            v *= atom()
        return v

    def add() -> int:
        nonlocal pos
        v = mul()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            v = v + mul() if op == "+" else v - mul()
        return v

    return add()


# ---- datasets ---------------------------------------------------------------------------------------
def problem(task: str, level: int, seed: int, index: int) -> Problem:
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rng = random.Random(f"moonlet-tasks:{seed}:{task}:{level}:{index}")
    prompt, solution, value = _GENERATORS[task](rng, level)
    return Problem(task, level, prompt, solution, str(value))


def generate(n: int, seed: int = 0, tasks: Sequence[str] = TASKS, levels: Sequence[int] = (1,),
             exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """n problems cycling through tasks x levels (problem i of each (task, level) from the seed);
    prompts in `exclude` (e.g. the training set's, to build a held-out test set) are skipped."""
    combos = [(t, lv) for lv in levels for t in tasks]
    out: list[Problem] = []
    index = 0
    tries = 0
    while len(out) < n:
        for t, lv in combos:
            p = problem(t, lv, seed, index)
            if p.prompt not in exclude:
                out.append(p)
                if len(out) == n:
                    break
            tries += 1
        index += 1
        if tries > 50 * n + 1000 and len(out) < n:
            raise ValueError(f"could only find {len(out)} of {n} problems not in `exclude` (the easy levels are small)")
    return out


def write_chat_jsonl(problems: Sequence[Problem], path: str | Path) -> Path:
    """SFT data in the chat JSONL format `moonlet sft --data` reads (with the answer kept for checking)."""
    from ..config import atomic_write_text

    lines = [json.dumps({"messages": p.messages(), "answer": p.answer, "task": p.task, "level": p.level})
             for p in problems]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def problems_to_dicts(problems: Sequence[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]


# ---- checking ---------------------------------------------------------------------------------------
_INT = r"-?\d[\d,]*"


def extract_answer(text: str) -> str | None:
    """The final integer answer of a completion, or None when there is none."""
    for pattern in (rf"answer is:?\s*\$?({_INT})", rf"=\s*({_INT})", rf"({_INT})"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return found[-1].replace(",", "")
    return None


def check(expected: Problem | str | int, completion: str) -> bool:
    """True when the completion's final integer equals the exact answer."""
    answer = expected.answer if isinstance(expected, Problem) else str(expected)
    got = extract_answer(completion)
    if got is None:
        return False
    try:
        return int(got) == int(answer)
    except ValueError:
        return False


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write synthetic verifiable problems as chat JSONL")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", type=int, nargs="+", default=[1])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    print(write_chat_jsonl(generate(a.n, a.seed, a.tasks, a.levels), a.out))
