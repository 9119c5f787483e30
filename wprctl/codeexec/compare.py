"""Is a program's output right? Two modes.

strict (default): what a competitive-programming checker does.
  - stdin problems: line by line after dropping trailing whitespace on each line and trailing empty
    lines; the same number of lines; in each line the same whitespace-separated tokens, each equal
    as text, or, when both are numbers and at least one is written with a decimal point or an
    exponent, within `tol` absolute or relative error (default 1e-6). Integers compare as text.
  - call-based problems: the returned value (through JSON, so tuples are lists) equals the expected
    one, recursively, with the same number tolerance and bool never equal to int; since APPS stores
    Codewars answers wrapped in a one-element list, `expected[0]` is accepted too.

compat: the leniency of the original APPS checker (hendrycks/apps eval/testing_util.py), which
accepts some wrong answers. An output passes if ANY of these holds:
  1. the whole output equals the expected one after stripping both;
  2. the lists of stripped non-empty lines are equal;
  3. every line is one number and they are all close (numpy.allclose: rtol 1e-5, atol 1e-8);
  4. the lists of per-line token lists (non-empty lines) are equal;
  5. same shape of tokens, all numbers, all close (as in 3);
  6. the SETS of per-line token SETS are equal: line order, token order within a line and
     duplicated lines or tokens are ignored (accepts "2 1" for "1 2");
  7. as 6 after rounding every number to 3 decimals (accepts 0.1234 for 0.1229).
  Call-based: `==` after tuples become lists, or `== expected[0]` (Python equality: True == 1).
"""

from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_INT = re.compile(r"[+-]?\d+\Z")


def outputs_match(actual: Any, expected: Any, *, kind: str, mode: str, tol: float = 1e-6) -> bool:
    if kind == "call":
        return (call_match_compat if mode == "compat" else call_match_strict)(actual, expected, tol)
    if not isinstance(actual, str):
        return False
    if mode == "compat":
        return stdout_match_compat(actual, expected)
    return stdout_match_strict(actual, expected, tol)


# ---------------------------------------------------------------------------------------------
# stdin problems


def _strict_lines(text: str) -> list[list[str]]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return [ln.split() for ln in lines]


def _numbers_close(a: str, b: str, tol: float) -> bool:
    if not (_NUMBER.match(a) and _NUMBER.match(b)) or (_INT.match(a) and _INT.match(b)):
        return False
    x, y = float(a), float(b)
    return abs(x - y) <= tol * max(1.0, abs(y))


def tokens_match_strict(a: str, b: str, tol: float = 1e-6) -> bool:
    return a == b or _numbers_close(a, b, tol)


def stdout_match_strict(actual: str, expected: str, tol: float = 1e-6) -> bool:
    got, want = _strict_lines(actual), _strict_lines(expected)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if len(g) != len(w) or not all(tokens_match_strict(x, y, tol) for x, y in zip(g, w)):
            return False
    return True


def _allclose(xs: list[float], ys: list[float]) -> bool:
    return len(xs) == len(ys) and all(
        abs(x - y) <= 1e-8 + 1e-5 * abs(y) or (x == y) for x, y in zip(xs, ys)
    )


def _floats(tokens: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        return None


def stdout_match_compat(actual: str, expected: str) -> bool:
    if actual.strip() == expected.strip():  # 1
        return True
    got = [ln.strip() for ln in actual.splitlines() if ln.strip()]
    want = [ln.strip() for ln in expected.split("\n") if ln.strip()]
    if got == want:  # 2
        return True
    fg, fw = _floats(got), _floats(want)
    if fg is not None and fw is not None and _allclose(fg, fw):  # 3
        return True
    got_t, want_t = [ln.split() for ln in got], [ln.split() for ln in want]
    if got_t == want_t:  # 4
        return True
    if len(got_t) == len(want_t) and all(len(a) == len(b) for a, b in zip(got_t, want_t)):  # 5
        fa = _floats([t for ln in got_t for t in ln])
        fb = _floats([t for ln in want_t for t in ln])
        if fa is not None and fb is not None and fa and _allclose(fa, fb):
            return True
    if {frozenset(ln) for ln in got_t} == {frozenset(ln) for ln in want_t}:  # 6
        return True
    rg, rw = _rounded_sets(got_t), _rounded_sets(want_t)
    return rg is not None and rg == rw  # 7


def _rounded_sets(lines: list[list[str]]) -> set[frozenset[float]] | None:
    try:
        return {frozenset(round(float(t), 3) for t in ln) for ln in lines}
    except (ValueError, OverflowError):
        return None


# ---------------------------------------------------------------------------------------------
# call-based problems


def _unwrap_candidates(expected: Any) -> list[Any]:
    cands = [expected]
    if isinstance(expected, list) and len(expected) >= 1:
        cands.append(expected[0])
    return cands


def call_match_compat(actual: Any, expected: Any, tol: float = 0.0) -> bool:
    for want in _unwrap_candidates(expected):
        try:
            if actual == want:
                return True
        except Exception:
            return False
    return False


def values_equal_strict(a: Any, b: Any, tol: float = 1e-6) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= tol * max(1.0, abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal_strict(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal_strict(a[k], b[k], tol) for k in a)
    return type(a) is type(b) and a == b


def call_match_strict(actual: Any, expected: Any, tol: float = 1e-6) -> bool:
    if values_equal_strict(actual, expected, tol):
        return True
    # APPS wraps Codewars answers in a one-element list: [answer].
    return (
        isinstance(expected, list)
        and len(expected) == 1
        and values_equal_strict(actual, expected[0], tol)
    )
