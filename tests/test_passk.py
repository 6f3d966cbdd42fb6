"""Pass@k: the stable product form equals the binomial definition and brute-force enumeration of k-subsets."""
import itertools
import math
from fractions import Fraction

import pytest

from dph_train.passk import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    labels = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(labels[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_matches_brute_force_and_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            got = pass_at_k(n, c, k)
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # comb(m, k) = 0 when m < k
            assert brute_force(n, c, k) == exact
            assert got == pytest.approx(float(exact), abs=1e-12)


def test_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not.
    exact = 1 - Fraction(math.comb(1000 - 3, 500), math.comb(1000, 500))
    assert pass_at_k(1000, 3, 500) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0  # n - c < k
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)


@pytest.mark.parametrize(
    "args, name",
    [((0, 0, 1), "n"), ((4, 5, 1), "c"), ((4, -1, 1), "c"), ((4, 2, 0), "k"), ((4, 2, 5), "k"),
     ((4.0, 2, 1), "n"), ((4, 2, True), "k")],
)
def test_bad_arguments_raise_naming_the_argument(args, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        pass_at_k(*args)


def test_mean_pass_at_k():
    counts = [0, 1, 8, 3]
    got = mean_pass_at_k(counts, 8, [1, 2, 8])
    assert set(got) == {1, 2, 8}
    for k in (1, 2, 8):
        assert got[k] == pytest.approx(sum(pass_at_k(8, c, k) for c in counts) / 4)
    assert got[1] == pytest.approx((0 + 1 + 8 + 3) / 32)  # pass@1 = mean accuracy
    with pytest.raises(ValueError, match="correct_counts"):
        mean_pass_at_k([], 8, [1])
    with pytest.raises(ValueError, match="^k "):
        mean_pass_at_k([1], 8, [16])
