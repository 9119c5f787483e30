"""pass@k and the APPS averages, as plain functions."""

from __future__ import annotations

import itertools
import random

import pytest

from wprctl.codeexec import SampleResult, pass_at_k, sample_reward, summarize
from wprctl.codeexec.passk import mean_pass_at_k, pass_at_k_exact


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Probability that a uniformly drawn k-subset of the samples contains a correct one."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_trivial_cases(n: int) -> None:
    assert pass_at_k(n, 0, 1) == 0.0  # c = 0
    assert pass_at_k(n, n, n) == 1.0  # c = n
    assert pass_at_k(n, n, 1) == 1.0
    assert pass_at_k(n, 1, n) == 1.0  # n = k: any correct sample is drawn
    assert pass_at_k(n, 0, n) == 0.0
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)


def test_matches_brute_force_enumeration() -> None:
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        c = sum(outcomes)
        for k in range(1, n + 1):
            want = brute_force_pass_at_k(outcomes, k)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
            assert pass_at_k_exact(n, c, k) == pytest.approx(want, abs=1e-12)


def test_large_n_is_stable() -> None:
    assert pass_at_k(1000, 3, 100) == pytest.approx(pass_at_k_exact(1000, 3, 100), rel=1e-9)


def test_needs_k_samples() -> None:
    with pytest.raises(ValueError, match="at least k=5"):
        pass_at_k(3, 1, 5)
    value, used = mean_pass_at_k([(3, 1), (10, 0), (10, 10)], 5)
    assert used == 2 and value == pytest.approx(0.5)  # the n=3 problem is left out
    assert mean_pass_at_k([(3, 1)], 5) == (None, 0)


def _result(pid: str, sample: int, verdicts: list[str], difficulty: str) -> SampleResult:
    r = SampleResult(
        pid, sample, verdicts, [0.0] * len(verdicts), [None] * len(verdicts), difficulty
    )
    r.reward = sample_reward(verdicts)
    return r


def test_reward_formula() -> None:
    assert sample_reward(["pass", "compile_error"]) == -1.0
    assert sample_reward(["pass", "runtime_error"]) == -0.6
    assert sample_reward(["pass", "timeout"]) == -0.6
    assert sample_reward(["pass", "pass"]) == pytest.approx(1.0)
    assert sample_reward(["fail", "fail"]) == pytest.approx(-0.3)
    assert sample_reward(["pass", "fail", "fail", "fail"]) == pytest.approx(-0.3 + 1.3 / 4)


def test_summary_per_problem_and_difficulty() -> None:
    results = [
        _result("a", 0, ["pass", "pass"], "introductory"),
        _result("a", 1, ["pass", "fail"], "introductory"),
        _result("b", 0, ["fail", "fail", "fail", "pass"], "interview"),
        _result("b", 1, ["compile_error"] * 4, "interview"),
        _result("c", 0, ["timeout"], "competition"),
    ]
    s = summarize(results, [1, 2])
    assert s["n_problems"] == 3 and s["n_samples"] == 5
    # strict accuracy per problem: a 1/2, b 0, c 0
    assert s["strict_accuracy"] == pytest.approx((0.5 + 0 + 0) / 3)
    # test-case average per problem: a (1 + 0.5)/2, b (0.25 + 0)/2, c 0
    assert s["test_case_average"] == pytest.approx((0.75 + 0.125 + 0) / 3)
    assert s["pass@k"]["1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert s["pass@k"]["2"] == pytest.approx(1.0 / 2)  # only a and b have 2 samples
    assert "pass@2 over 2/3 problems" in s["pass@k_note"]
    assert list(s["by_difficulty"]) == ["introductory", "interview", "competition"]
    assert s["by_difficulty"]["introductory"]["test_case_average"] == pytest.approx(0.75)
    assert s["verdicts"]["compile_error"] == 4
