"""Tasks with verifiable rewards: a prompt set (train / test / ood splits; a task may name its own, see task_splits)
and a scorer that never raises.

    task = get_task("arith", seed=0)
    ex = task.examples("train")[0]
    task.score(ex, "The sum is \\boxed{81}.")   # Score(reward=1.0, reason="ok")

Every Score carries a reason from the task's REASONS so that failures are counted, not hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

SPLITS = ("train", "test", "ood")


@dataclass(frozen=True)
class Example:
    id: str  # stable unique id (includes the split)
    prompt: str  # the user message; the training loop applies the chat template
    answer: object  # gold answer: arith -> str of a number; sql -> gold SQL string
    meta: dict = field(default_factory=dict)  # e.g. {"db_path": ..., "semantics": "set"} for sql


@dataclass(frozen=True)
class Score:
    reward: float  # 1.0 or 0.0
    reason: str  # one of the task's REASONS
    detail: str = ""  # free text for logs (the error message, ...); never needed for the reward


@runtime_checkable
class Task(Protocol):
    name: str
    REASONS: tuple[str, ...]

    def examples(self, split: str) -> list[Example]: ...

    def score(self, example: Example, response: str) -> Score: ...


def check_split(split: str, allowed: tuple = SPLITS) -> str:
    """`split`, when it is one of `allowed` (a task with its own splits passes its SPLITS)."""
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
    return split


def task_splits(name: str, kwargs: dict | None = None) -> tuple:
    """The split names of the task `name` built with `kwargs`, without building it (config validation uses it)."""
    if name == "styles":
        from .styles import PROBE_SPLIT, StylesTask

        return StylesTask.SPLITS + ((PROBE_SPLIT,) if (kwargs or {}).get("spelling") == "words" else ())
    return SPLITS


def get_task(name: str, **kwargs) -> Task:
    """Build a task by name: "arith" | "math" | "sql" | "styles" | "bird" | "spider"; kwargs go to its constructor."""
    # Imports are local so that importing the registry stays cheap.
    if name == "arith":
        from .arith import ArithTask

        return ArithTask(**kwargs)
    if name == "math":
        from .math import MathTask

        return MathTask(**kwargs)
    if name == "sql":
        from .sql import SqlTask

        return SqlTask(**kwargs)
    if name == "styles":
        from .styles import StylesTask

        return StylesTask(**kwargs)
    if name == "bird":
        from .bird_spider import BirdTask

        return BirdTask(**kwargs)
    if name == "spider":
        from .bird_spider import SpiderTask

        return SpiderTask(**kwargs)
    raise ValueError(f"unknown task name {name!r}; expected one of 'arith', 'math', 'sql', 'styles', 'bird', 'spider'")


__all__ = ["SPLITS", "Example", "Score", "Task", "check_split", "get_task", "task_splits"]
