"""Procedural arithmetic: determinism, disjoint splits, answer extraction edge cases, scoring reasons."""
import pytest

from dph_train.tasks import Example, Score, Task, get_task
from dph_train.tasks.arith import ArithTask, extract_answer, last_boxed


def test_deterministic_from_seed_and_seed_matters():
    a, b, c = ArithTask(seed=0), ArithTask(seed=0), ArithTask(seed=1)
    for split in ("train", "test", "ood"):
        assert a.examples(split) == b.examples(split)
    assert [e.prompt for e in a.examples("train")] != [e.prompt for e in c.examples("train")]


def test_splits_sizes_disjoint_and_ood_is_unseen():
    task = ArithTask(seed=3, n_train=500, n_test=100, n_ood=50)
    train, test, ood = (task.examples(s) for s in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (500, 100, 50)
    prompts = [e.prompt for e in train + test + ood]
    assert len(set(prompts)) == len(prompts)  # no duplicates inside or across splits
    ids = [e.id for e in train + test + ood]
    assert len(set(ids)) == len(ids)
    for e in train + test:
        assert e.meta["a"] < 100 and e.meta["b"] < 100 and e.meta["op"] in "+-*"
    for e in ood:  # operand length never seen in training
        assert e.meta["a"] >= 100 and e.meta["b"] >= 100
    for e in train + test + ood:
        a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
        assert e.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert e.prompt == f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}."
    assert {e.meta["op"] for e in train} == {"+", "-", "*"}


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is \\boxed{81}.", "81"),
        ("23 + 58 = 81", "81"),
        ("so it is 81.", "81"),
        ("23 - 58 = -35", "-35"),
        ("\\boxed{-35}", "-35"),
        ("\\boxed{ \u221235 }", "-35"),  # unicode minus
        ("The total is 1,234.", "1234"),
        ("\\boxed{1{,}234}", "1234"),
        ("12.0", "12.0"),
        ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\boxed{5} and then 99 more words", "5"),  # a box wins over later numbers
        ("\\boxed{23 + 58 = 81}", "81"),
        ("\\boxed{\\frac{1}{2}} hmm 7", "2"),  # nested braces parsed; last number in the box
        ("answer \\boxed{42} and a truncated \\boxed{4", "42"),  # unclosed last box: use the previous one
        ("pages 5-3", "3"),
        ("no digits here", None),
        ("\\boxed{x}", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_last_boxed():
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("nothing") is None


def test_score_reasons_and_never_raises():
    task = get_task("arith", seed=0, n_train=10, n_test=10, n_ood=10)
    assert isinstance(task, Task) and task.name == "arith"
    ex = Example(id="x", prompt="What is 6 * 7?", answer="42", meta={})
    assert task.score(ex, "6*7 = \\boxed{42}") == Score(1.0, "ok")
    assert task.score(ex, "It is 42.0.") == Score(1.0, "ok")
    bad = task.score(ex, "\\boxed{41}")
    assert (bad.reward, bad.reason) == (0.0, "mismatch")
    assert task.score(ex, "I don't know") == Score(0.0, "no_answer")
    for junk in [None, 12, "\\boxed{" * 1000, "}" * 50, "\x00\ud800", "9" * 5000]:
        s = task.score(ex, junk)
        assert s.reason in task.REASONS and s.reward in (0.0, 1.0)
    neg = Example(id="y", prompt="", answer="-35", meta={})
    assert task.score(neg, "23 - 58 = -35").reward == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        ArithTask(n_train=-1)
    with pytest.raises(ValueError, match="split"):
        ArithTask(n_train=1, n_test=1, n_ood=1).examples("validation")
    with pytest.raises(ValueError, match="unknown task name 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="distinct"):
        ArithTask(n_train=10**6)
    with pytest.raises(ValueError, match="n_ood"):
        ArithTask(n_ood=10**7)
