"""The real APPS samples (tests/fixtures/apps/apps.jsonl, a copy of ../shared/data/apps.jsonl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wprctl.codeexec import (
    ExecConfig,
    ExecPool,
    evaluate_samples,
    load_problems,
    reference_generations,
)

APPS = Path(__file__).parent / "fixtures" / "apps" / "apps.jsonl"
# Generous: these are correct programs, and the machine may be loaded.
CONFIG = ExecConfig(timeout=10, workers=2, mode="compat")

# Problems that accept several valid answers while the data stores one; the first reference
# solution prints another valid answer (apps_verify.md). compat's line/token-set leniency accepts
# 8 of these 10; strict accepts none.
MULTI_ANSWER = {"25", "33", "53", "56", "66", "73", "74", "79", "86", "94"}


@pytest.fixture(scope="module")
def problems():
    return load_problems(APPS)


@pytest.fixture(scope="module")
def pool():
    with ExecPool(CONFIG) as p:
        yield p


def first_solutions(problems):
    return [(pid, p.solutions[0]) for pid, p in problems.items() if p.solutions]


def test_loaded_as_documented(problems) -> None:
    assert len(problems) == 104
    kinds = [p.kind for p in problems.values()]
    assert kinds.count("call") == 2
    assert problems["2404"].use_class and not problems["4184"].use_class
    assert problems["4184"].n_tests == 8 and problems["2287"].n_tests == 3


def test_reference_solutions_compat(problems, pool) -> None:
    results = evaluate_samples(problems, first_solutions(problems), pool=pool, progress=False)
    failing = {r.problem_id for r in results if not r.all_passed}
    # Measured: 102/104 pass under compat; the two that do not are multi-answer problems.
    assert failing == {"56", "73"}, [(r.problem_id, r.errors) for r in results if not r.all_passed]
    assert all(v in ("pass", "fail") for r in results for v in r.verdicts)  # no crash, no timeout


def test_reference_solutions_strict(problems) -> None:
    results = evaluate_samples(
        problems, first_solutions(problems), CONFIG.with_(mode="strict"), progress=False
    )
    failing = {r.problem_id for r in results if not r.all_passed}
    # Measured: 94/104 pass under strict (token-wise lines, numbers within 1e-6), exactly the
    # multi-answer problems fail; a stripped-output equality would pass only 83 (apps_verify.md).
    assert failing == MULTI_ANSWER
    assert sum(r.all_passed for r in results) == 94


def test_known_wrong_programs_fail(problems, pool) -> None:
    ids = [pid for pid, p in problems.items() if p.solutions][:30]
    # each problem gets the next problem's reference solution
    wrong = [(pid, problems[ids[(i + 1) % len(ids)]].solutions[0]) for i, pid in enumerate(ids)]
    results = evaluate_samples(problems, wrong, pool=pool, progress=False)
    assert not any(r.all_passed for r in results)
    assert all(r.reward < 1.0 for r in results)


def test_weakened_generations_separate(problems, pool) -> None:
    sub = {pid: problems[pid] for pid in [*list(problems)[:20], "2404", "4184", "2287"]}
    good = reference_generations(sub, 2, weaken=False, seed=1)
    weak = reference_generations(sub, 2, weaken=True, seed=1)
    assert weak == reference_generations(sub, 2, weaken=True, seed=1)  # deterministic
    assert {r["weakening"] for r in weak} >= {"correct", "partial", "compile_error"}
    rg = evaluate_samples(sub, [(r["id"], r["response"]) for r in good], pool=pool, progress=False)
    rw = evaluate_samples(sub, [(r["id"], r["response"]) for r in weak], pool=pool, progress=False)
    mean = lambda rs: sum(r.reward for r in rs) / len(rs)  # noqa: E731
    assert mean(rg) > mean(rw) + 0.5
    for row, res in zip(weak, rw):
        if row["weakening"] == "compile_error":
            assert set(res.verdicts) == {"compile_error"} and res.reward == -1.0
        if row["weakening"] == "runtime_error":
            assert res.reward == -0.6
    # 4184 has 8 tests: its partial weakening fails some and passes others
    partial = [
        res for row, res in zip(weak, rw) if row["id"] == "4184" and row["weakening"] == "partial"
    ]
    for res in partial:
        assert 0 < res.passed < res.total


def test_execution_reward_for_ppo(problems, pool) -> None:
    from wprctl.codeexec import execution_reward

    sol = problems["4184"].solutions[0]
    samples = [
        ("4184", sol),
        ("4184", "def is_prime(:"),
        ("4184", "def is_prime(n):\n    return 1 / 0"),
    ]
    assert execution_reward(problems, samples, pool=pool) == pytest.approx([1.0, -1.0, -0.6])
