"""Unbiased Pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

From n samples of which c are correct, the probability that at least one of k samples drawn without replacement is
correct is 1 - C(n-c, k) / C(n, k). The binomials overflow floats for large n, so it is computed as the equivalent
product 1 - prod_{i=n-c+1}^{n} (1 - k/i).
"""
from __future__ import annotations

from typing import Iterable


def _check_int(name: str, value) -> int:
    # bool is an int subclass; passing True as a count is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples with c correct (1 <= k <= n, 0 <= c <= n)."""
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct_counts: Iterable[int], n: int, ks: Iterable[int]) -> dict[int, float]:
    """Pass@k averaged over prompts; correct_counts[i] = number of correct samples (out of n) for prompt i."""
    counts = list(correct_counts)
    ks = list(ks)
    if not counts:
        raise ValueError("correct_counts is empty")
    if not ks:
        raise ValueError("ks is empty")
    return {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
