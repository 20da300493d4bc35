"""pass@k: the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained
on Code", for n samples of which c are correct:

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as a product (1 - k / i for i in n-c+1 .. n) so large n does not overflow.
"""

from __future__ import annotations

import math
from typing import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Average of pass@k over problems given (n, c) per problem."""
    counts = list(counts)
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def default_ks(n: int) -> list[int]:
    """The k values worth reporting for n samples per problem: 1, 2, 5, 10, ... and n itself."""
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n]
    return ks + [n] if n not in ks else ks
