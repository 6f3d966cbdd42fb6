"""Procedural arithmetic from a seed: small problems a 135M instruct model gets partly right.

In-domain (train / test, disjoint): "a + b", "a - b" with 1-2 digit operands and "a * b" with a 1-digit multiplier.
Out-of-domain: 3-digit operands (+ and -), an operand length never seen in training.
Answer: the last \\boxed{...} if the response has one, else the last number in the text; reward 1 iff math-verify
(the math task's verifier, dph_train/tasks/math.py) finds it equal to the gold integer (so "12.0", "1,234" and
"\\boxed{-35}." are all read as numbers).
"""
from __future__ import annotations

import random
import re

from . import Example, Score, check_split

REASONS = ("ok", "mismatch", "no_answer", "parse_failure", "timeout")

_BOXED = re.compile(r"\\boxed\s*\{")
# A number not glued to a word or a preceding digit: "5-3" reads as 5 and 3, "= -35" as -35, "1,234.5" as one number.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (nested braces allowed), or None."""
    if "\\boxed" not in text:
        return None
    # Pair every brace once with a stack (linear even for pathological text), then take the last \boxed whose
    # brace closes; an unclosed one (a truncated generation) falls back to an earlier box.
    close_of: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close_of[stack.pop()] = i
    for m in reversed(list(_BOXED.finditer(text))):
        brace = m.end() - 1
        if brace in close_of:
            return text[brace + 1 : close_of[brace]]
    return None


def extract_answer(text: str) -> str | None:
    """The answer as a plain number string ("-1234", "12.0"), or None when there is none."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    body = text if boxed is None else boxed
    # Unicode minus and LaTeX thousands separators ("1{,}234") appear in model output.
    body = body.replace("\u2212", "-").replace("{,}", ",")
    numbers = _NUMBER.findall(body)
    if not numbers:
        return None
    return numbers[-1].replace(",", "")


class ArithTask:
    name = "arith"
    REASONS = REASONS

    def __init__(self, seed: int = 0, n_train: int = 2000, n_test: int = 200, n_ood: int = 200):
        for arg, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
        self.seed = seed
        # String seeds hash with sha512 in `random`, so the problems are the same on every machine and run.
        if n_train + n_test > IN_DOMAIN_SIZE:
            raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {IN_DOMAIN_SIZE} distinct problems")
        if n_ood > OOD_SIZE:
            raise ValueError(f"n_ood = {n_ood} exceeds the {OOD_SIZE} distinct problems")
        in_domain = _unique_problems(random.Random(f"arith:{seed}:in"), _in_domain_problem, n_train + n_test)
        ood = _unique_problems(random.Random(f"arith:{seed}:ood"), _ood_problem, n_ood)
        self._splits = {
            "train": [_example("train", i, p) for i, p in enumerate(in_domain[:n_train])],
            "test": [_example("test", i, p) for i, p in enumerate(in_domain[n_train:])],
            "ood": [_example("ood", i, p) for i, p in enumerate(ood)],
        }

    def examples(self, split: str) -> list[Example]:
        return list(self._splits[check_split(split)])

    def score(self, example: Example, response: str) -> Score:
        try:
            from .math import verify_answer

            pred = extract_answer(response)
            if pred is None:
                return Score(0.0, "no_answer")
            s = verify_answer(str(example.answer), pred)
            return s if s.reason != "mismatch" else Score(0.0, "mismatch", f"got {pred}, want {example.answer}")
        except Exception as e:  # scoring must never crash training; the reason keeps the failure visible
            return Score(0.0, "no_answer", f"scorer error: {e!r}")


# Distinct problems per domain: a +/- b with a, b in [0, 99], a * b with b in [2, 9]; 3-digit a +/- b.
IN_DOMAIN_SIZE = 2 * 100 * 100 + 100 * 8
OOD_SIZE = 2 * 900 * 900


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _in_domain_problem(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choices(["+", "-", "*"], weights=[0.4, 0.4, 0.2])[0]
    a = _operand(rng, rng.choice([1, 2]))
    b = rng.randint(2, 9) if op == "*" else _operand(rng, rng.choice([1, 2]))
    return a, op, b


def _ood_problem(rng: random.Random) -> tuple[int, str, int]:
    return _operand(rng, 3), rng.choice(["+", "-"]), _operand(rng, 3)


def _unique_problems(rng: random.Random, draw, n: int) -> list[tuple[int, str, int]]:
    # Rejection sampling; the sizes are checked against the domain sizes first, so this terminates.
    seen: dict[tuple[int, str, int], None] = {}  # insertion-ordered set keeps the output deterministic
    while len(seen) < n:
        seen.setdefault(draw(rng), None)
    return list(seen)


def _example(split: str, i: int, problem: tuple[int, str, int]) -> Example:
    a, op, b = problem
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Example(
        id=f"arith-{split}-{i:05d}",
        prompt=f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}.",
        answer=str(value),
        meta={"a": a, "op": op, "b": b},
    )
