"""Pass@k and the APPS averages: plain functions on counts, no execution."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import comb, prod


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for one problem with n samples, c correct.

    Computed as a product (Chen et al. 2021) so it stays exact-ish for large n; requires n >= k.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or n < k:
        raise ValueError(f"pass@{k} needs at least k={k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_exact(n: int, c: int, k: int) -> float:
    """The same quantity with exact binomials (reference for tests)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> tuple[float | None, int]:
    """Mean pass@k over problems given (n, c) pairs, using only problems with n >= k.

    Returns (value or None when no problem has k samples, number of problems used)."""
    vals = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
