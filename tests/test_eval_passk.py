"""pass@k: the unbiased estimator against the closed form 1 - C(n-c, k) / C(n, k)."""

import math

import pytest

from moonlet.eval.passk import default_ks, mean_pass_at_k, pass_at_k


def closed_form(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 200])
def test_matches_closed_form(n):
    for c in range(n + 1):
        for k in sorted({1, 2, 5, 10, 100, n}):
            if k <= n:
                assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_known_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0  # n - c < k: some draw always contains the correct one
    assert pass_at_k(100, 1, 10) == pytest.approx(0.1)  # 1 - C(99,10)/C(100,10) = 10/100
    # large n: the product form stays finite where C(n, k) overflows floats
    assert pass_at_k(2000, 10, 100) == pytest.approx(closed_form(2000, 10, 100), rel=1e-9)


def test_mean_and_errors():
    assert mean_pass_at_k([(5, 2), (5, 0)], 2) == pytest.approx(0.35)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    assert default_ks(10) == [1, 2, 5, 10] and default_ks(1) == [1] and default_ks(4) == [1, 2, 4]
