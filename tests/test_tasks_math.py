"""The math task: MATH / GSM8K JSONL, graded by the real math-verify; every score carries a reason."""
import json

import pytest

pytest.importorskip("math_verify")

from dph_train.tasks import Example, Score, Task, get_task  # noqa: E402
from dph_train.tasks.math import REASONS, gold_of, verify_answer  # noqa: E402


def test_shipped_sample_loads_both_formats():
    task = get_task("math")
    assert isinstance(task, Task) and task.name == "math" and task.REASONS == REASONS
    sizes = {s: len(task.examples(s)) for s in ("train", "test", "ood")}
    assert sizes == {"train": 8, "test": 4, "ood": 4}
    ex = task.examples("train")[0]
    assert ex.answer == "27" and ex.prompt.endswith("Put the final answer in \\boxed{}.")
    assert [e.answer for e in task.examples("test")][2:] == ["$\\frac{7}{8}$", "$5\\sqrt{2}$"]
    assert len({e.id for s in ("train", "test", "ood") for e in task.examples(s)}) == 16


@pytest.mark.parametrize("row, gold", [
    ({"question": "q", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"}, "42"),
    ({"question": "q", "answer": "so\n#### 1,234"}, "1234"),
    ({"problem": "p", "solution": "first \\boxed{1}, then $\\boxed{\\frac{a}{b}}$."}, "$\\frac{a}{b}$"),
    ({"problem": "p", "solution": "\\boxed{3}", "answer": "\\frac{1}{4}"}, "$\\frac{1}{4}$"),
    ({"problem": "p", "answer": 12}, "12"),
])
def test_gold_answers(row, gold):
    assert gold_of(row) == gold


@pytest.mark.parametrize("gold, response, reason", [
    ("$\\frac{7}{8}$", "The sum is \\boxed{\\frac{7}{8}}.", "ok"),
    ("$\\frac{7}{8}$", "\\boxed{0.875}", "ok"),
    ("$5\\sqrt{2}$", "so $\\boxed{\\sqrt{50}}$", "ok"),
    ("1234", "The total is 1,234.", "ok"),
    ("27", "She makes 27 rolls.", "ok"),
    ("$\\frac{7}{8}$", "\\boxed{\\frac{6}{8}}", "mismatch"),
    ("27", "I do not know.", "no_answer"),
    ("27", "", "no_answer"),
    ("27", None, "no_answer"),
    ("27", "\\boxed{x +* y}", "parse_failure"),
    ("$8$", "\\boxed{9^{9^{9^{9^{9}}}}}", "timeout"),  # sympy would compare a tower of powers for ever
])
def test_every_score_has_a_reason(gold, response, reason):
    s = verify_answer(gold, response, timeout_s=1)
    assert isinstance(s, Score) and s.reason == reason and s.reason in REASONS
    assert s.reward == (1.0 if reason == "ok" else 0.0)


def test_score_never_raises():
    task = get_task("math", n_train=1, n_test=1, n_ood=1)
    ex = task.examples("train")[0]
    for junk in [12, "\\boxed{" * 500, "}" * 50, "\x00\ud800", "9" * 5000]:
        s = task.score(ex, junk)
        assert s.reason in REASONS and s.reward in (0.0, 1.0)
    bad_gold = Example(id="g", prompt="", answer="$\\frac{}$", meta={})
    assert task.score(bad_gold, "\\boxed{1}").reason == "parse_failure"


def test_user_files_and_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"problem": "What is $2+2$?", "solution": "$\\boxed{4}$", "unique_id": "p1"}) + "\n\n"
                 + json.dumps({"question": "3 apples and 2 more?", "answer": "#### 5"}) + "\n")
    task = get_task("math", train=str(f), test=str(f), ood=str(f), n_test=1)
    assert [e.id for e in task.examples("train")] == ["p1", "math-train-00001"]
    assert len(task.examples("test")) == 1
    assert task.score(task.examples("train")[1], "\\boxed{5}") == Score(1.0, "ok")
    with pytest.raises(FileNotFoundError, match="train file"):
        get_task("math", train=str(tmp_path / "nope.jsonl"))
    f.write_text('{"problem": "no answer here", "solution": "none"}\n')
    with pytest.raises(ValueError, match="mine.jsonl:1: no gold answer"):
        get_task("math", train=str(f))
    f.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="'problem' \\(MATH\\) or 'question' \\(GSM8K\\)"):
        get_task("math", train=str(f))


def test_arith_compares_through_the_same_verifier(monkeypatch):
    import dph_train.tasks.math as m

    calls = []
    real = m.verify_answer
    monkeypatch.setattr(m, "verify_answer", lambda g, r, *a, **k: calls.append((g, r)) or real(g, r, *a, **k))
    task = get_task("arith", n_train=1, n_test=1, n_ood=1)
    ex = Example(id="x", prompt="", answer="42", meta={})
    assert task.score(ex, "6*7 = \\boxed{42.0}") == Score(1.0, "ok")
    assert calls == [("42", "42.0")]
