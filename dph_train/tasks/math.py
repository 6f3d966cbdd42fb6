"""Math problems from user JSONL files, graded by math-verify (the verifier TRL and open-r1 use).

    task = get_task("math", train="gsm8k_train.jsonl", test="math500.jsonl", ood="aime.jsonl")
    task = get_task("math")        # the small shipped sample (dph_train/tasks/data/math_sample_*.jsonl)

One problem per line, in either usual format:
    GSM8K: {"question": ..., "answer": "... #### 72"}          (the gold answer follows "####")
    MATH:  {"problem": ..., "solution": "... \\boxed{\\frac{7}{8}} ..."}   (the gold answer is the last \\boxed{});
           an "answer" field, when present, is the gold answer itself.
The prompt is the problem and "Put the final answer in \\boxed{}."; the response's answer is what math-verify
extracts (the last \\boxed{} first, else a LaTeX / plain expression), compared with the gold symbolically (so 0.5 ==
\\frac{1}{2}, \\sqrt{18} == 3\\sqrt{2}, 1,234 == 1234). Every score carries a reason from REASONS:
    ok, mismatch, no_answer (nothing extractable), parse_failure (a \\boxed{} whose content does not parse, or a
    verifier error), timeout (parsing or comparing took longer than timeout_s).
"""
from __future__ import annotations

import json
import os
import re
import threading

from . import Example, Score, check_split

REASONS = ("ok", "mismatch", "no_answer", "parse_failure", "timeout")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLE = {split: os.path.join(DATA, f"math_sample_{split}.jsonl") for split in ("train", "test", "ood")}
INSTRUCTION = "Put the final answer in \\boxed{}."
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)


def _mv():
    try:
        import math_verify
    except ImportError as e:  # the train extra pins it
        raise ImportError("the math task and the arith verifier need math-verify: pip install 'dph[train]'") from e
    return math_verify


def _timeout(timeout_s):
    # math-verify's timeout is signal.alarm, which works only in the main thread; elsewhere none is set.
    return timeout_s if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str, timeout_s: int = 5):
    """math-verify's parse of a response or gold string: a non-empty list, or [] when nothing is extractable.
    Raises TimeoutException / other errors (raise_on_error) for the caller to classify."""
    return _mv().parse(text, parsing_timeout=_timeout(timeout_s), raise_on_error=True)


def _readable(parsed) -> bool:
    """math-verify found an expression (not only the raw text it falls back to when sympy cannot read it)."""
    return any(not isinstance(x, str) for x in parsed)


def verify_answer(gold, response: str, timeout_s: int = 5) -> Score:
    """Score a response against a gold answer (a string, or the list parse_answer returned for it). Never raises."""
    from math_verify.errors import TimeoutException

    from .arith import last_boxed

    if not isinstance(response, str):
        return Score(0.0, "no_answer", f"response is {type(response).__name__}, not text")
    try:
        g = parse_answer(gold, timeout_s) if isinstance(gold, str) else gold
        if not _readable(g):
            return Score(0.0, "parse_failure", f"gold answer {gold!r} does not parse")
        pred = parse_answer(response, timeout_s)
        if not pred:
            boxed = last_boxed(response)
            if boxed is not None:
                return Score(0.0, "parse_failure", f"\\boxed{{{boxed[:80]}}} does not parse")
            return Score(0.0, "no_answer")
        if not _readable(pred):  # found, but only as raw text: sympy could not read it
            return Score(0.0, "parse_failure", f"answer {pred[-1][:80]!r} does not parse")
        ok = _mv().verify(g, pred, timeout_seconds=_timeout(timeout_s), raise_on_error=True)
    except TimeoutException:
        return Score(0.0, "timeout", f"math-verify took over {timeout_s}s")
    except Exception as e:  # scoring must never crash training; the reason keeps the failure visible
        return Score(0.0, "parse_failure", f"verifier error: {e!r}"[:200])
    if ok:
        return Score(1.0, "ok")
    return Score(0.0, "mismatch", f"got {pred[-1]!s:.80}, want {g[-1]!s:.80}")


def gold_of(row: dict, where: str = "row") -> str:
    """The gold answer of a MATH / GSM8K row, as a string math-verify parses ("$...$" for LaTeX)."""
    from .arith import last_boxed

    answer, solution = row.get("answer"), row.get("solution")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        m = _GSM8K.search(answer)
        text = m.group(1) if m else answer.strip()
        return text.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", text) else f"${text}$"
    if isinstance(solution, str):
        boxed = last_boxed(solution)
        if boxed is not None:
            return f"${boxed}$"
    raise ValueError(f"{where}: no gold answer (an 'answer' field, a GSM8K '#### x' answer, or a \\boxed{{}} in "
                     "'solution')")


def load_jsonl(path: str, split: str) -> list[Example]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"math task: {split} file {path!r} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path}:{i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            problem = row.get("problem", row.get("question")) if isinstance(row, dict) else None
            if not isinstance(problem, str) or not problem.strip():
                raise ValueError(f"{where}: needs a 'problem' (MATH) or 'question' (GSM8K) string")
            out.append(Example(id=str(row.get("id", row.get("unique_id", f"math-{split}-{len(out):05d}"))),
                               prompt=f"{problem.strip()}\n\n{INSTRUCTION}", answer=gold_of(row, where),
                               meta={"source": os.path.basename(path)}))
    return out


class MathTask:
    name = "math"
    REASONS = REASONS

    def __init__(self, seed: int = 0, train: str | None = None, test: str | None = None, ood: str | None = None,
                 n_train: int | None = None, n_test: int | None = None, n_ood: int | None = None,
                 timeout_s: int = 5):
        """train / test / ood: JSONL paths (default: the shipped sample); n_*: keep the first n of a split.
        seed is accepted for the common interface; the files' order is the order."""
        _mv()
        if not (isinstance(timeout_s, int) and timeout_s >= 1):
            raise ValueError(f"timeout_s must be an int >= 1 (math-verify's alarm counts seconds), got {timeout_s!r}")
        self.seed, self.timeout_s = seed, timeout_s
        self._splits = {}
        for split, path, n in (("train", train, n_train), ("test", test, n_test), ("ood", ood, n_ood)):
            if n is not None and (not isinstance(n, int) or n < 0):
                raise ValueError(f"n_{split} must be a non-negative int or None, got {n!r}")
            exs = load_jsonl(os.path.expanduser(path or SAMPLE[split]), split)
            self._splits[split] = exs[:n] if n is not None else exs
        self._gold: dict = {}

    def examples(self, split: str) -> list[Example]:
        return list(self._splits[check_split(split)])

    def score(self, example: Example, response: str) -> Score:
        key = str(example.answer)
        if key not in self._gold:  # each gold answer is parsed once
            try:
                self._gold[key] = parse_answer(key, self.timeout_s)
            except Exception:
                self._gold[key] = []
        gold = self._gold[key]
        if not _readable(gold):
            return Score(0.0, "parse_failure", f"gold answer {key!r} does not parse")
        return verify_answer(gold, response, self.timeout_s)
