"""Output comparison (strict vs compat) and code extraction."""

from __future__ import annotations

import pytest

from wprctl.codeexec import extract_code, outputs_match


def strict(a, b, kind="stdin"):
    return outputs_match(a, b, kind=kind, mode="strict")


def compat(a, b, kind="stdin"):
    return outputs_match(a, b, kind=kind, mode="compat")


def test_strict_stdin() -> None:
    assert strict("1 2\n3\n", "1 2 \n3")  # trailing spaces and final newline
    assert strict("1  2\n", "1 2\n")  # tokens, not spacing
    assert strict("1.0000000000000002\n", "1.000000000\n")  # numbers within 1e-6
    assert strict("3.0\n", "3\n")
    assert not strict("1.001\n", "1.000\n")
    assert not strict("007\n", "7\n")  # integers compare as text
    assert not strict("2 1\n", "1 2\n")
    assert not strict("1\n2\n", "1 2\n")  # line structure matters
    assert not strict("1\n\n2\n", "1\n2\n")
    assert not strict("nan\n", "NaN\n")
    assert not strict("YES\n", "yes\n")


def test_compat_accepts_what_apps_accepts() -> None:
    assert compat("  1\n2  ", "1\n2\n")  # whole-output strip
    assert compat("1\n\n2\n", "1\n2\n")  # empty lines ignored
    assert compat("0.333333\n", "0.3333333333\n")  # allclose on number lines
    assert compat("2 1\n", "1 2\n")  # token sets per line: a wrong answer accepted
    assert compat("b\na\n", "a\nb\n")  # line order ignored
    assert compat("0.1234\n", "0.1229\n")  # rounding to 3 decimals
    assert not compat("1 2\n", "1 3\n")
    assert not compat("YES\n", "NO\n")


@pytest.mark.parametrize("mode", ["strict", "compat"])
def test_call_based(mode: str) -> None:
    m = lambda a, b: outputs_match(a, b, kind="call", mode=mode)  # noqa: E731
    assert m([1, 2], [1, 2])
    assert m(True, [True])  # APPS wraps Codewars answers in a list
    assert m([[1, 2]], [[1, 2]])
    assert not m([2, 1], [1, 2])
    assert not m(None, [1])


def test_call_based_strictness() -> None:
    assert outputs_match(1, True, kind="call", mode="compat")  # Python's True == 1
    assert not outputs_match(1, True, kind="call", mode="strict")
    assert outputs_match(0.30000000000000004, 0.3, kind="call", mode="strict")
    assert outputs_match({"1": 2}, {"1": 2}, kind="call", mode="strict")


def test_extract_fenced_and_plain() -> None:
    text = "Here you go:\n```text\n3\n```\n```python\nprint(1)\n```\nand also\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(1)\n"
    assert extract_code("```\nx = 1\nprint(x)\n```") == "x = 1\nprint(x)\n"
    assert extract_code("```python\nprint(1)\n# truncated") == "print(1)\n# truncated\n"
    prompt = "### Problem:\nAdd.\n\n### Response:\nprint(sum(map(int, input().split())))"
    assert extract_code(prompt) == "print(sum(map(int, input().split())))\n"
    assert (
        extract_code("QUESTION:\nq\nUse Standard Input format\nANSWER:\nprint(2)\n") == "print(2)\n"
    )


def test_extract_puts_starter_code_back() -> None:
    starter = "def is_prime(n):\n\t"
    body = "return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))"
    code = extract_code(body, starter, "is_prime")
    ns: dict = {}
    exec(code, ns)
    assert ns["is_prime"](7) and not ns["is_prime"](8)
    full = "def is_prime(n):\n    return n == 2\n"
    assert extract_code(full, starter, "is_prime") == full
