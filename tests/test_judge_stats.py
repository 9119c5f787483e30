"""Both-orders consistency, counting, win-rate arithmetic, flip rate, bootstrap coverage, cost."""

from __future__ import annotations

import numpy as np
import pytest

from wprctl.judge import stats
from wprctl.judge.cost import Spend, cost_usd, price_for
from wprctl.judge.io import Pair
from wprctl.judge.run import model_verdict, orders_for


@pytest.mark.parametrize(
    ("verdicts", "winner"),
    [
        (["A", "A"], "A"),
        (["B", "B"], "B"),
        (["A", "B"], "tie"),  # disagreement across orders
        (["B", "A"], "tie"),
        (["A", "tie"], "tie"),
        (["tie", "B"], "tie"),
        (["tie", "tie"], "tie"),
        (["A", "invalid"], "invalid"),
        (["invalid", "invalid"], "invalid"),
        (["B"], "B"),  # --orders random: one verdict
        (["invalid"], "invalid"),
    ],
)
def test_both_orders_rule(verdicts: list[str], winner: str) -> None:
    assert stats.combine(verdicts) == winner


def test_shown_letters_map_through_the_order() -> None:
    # Order "BA" shows model B first, so the judge's "A" (first shown) means model B won.
    assert model_verdict("A", "AB") == "A"
    assert model_verdict("A", "BA") == "B"
    assert model_verdict("B", "BA") == "A"
    assert model_verdict("E", "BA") == "tie"
    assert model_verdict(None, "AB") == "invalid"


def test_win_rate_arithmetic_and_invalid_is_never_a_loss() -> None:
    winners = ["A"] * 6 + ["tie"] * 2 + ["B"] * 2 + ["invalid"] * 5
    c = stats.count(winners)
    assert (c.wins, c.ties, c.losses, c.invalid) == (6, 2, 2, 5)
    assert stats.win_rate(c) == pytest.approx((6 + 1) / 10)
    assert stats.win_rate_no_ties(c) == pytest.approx(6 / 8)
    assert stats.win_rate(stats.count(["invalid"])) is None
    assert stats.win_rate_no_ties(stats.count(["tie", "tie"])) is None


def test_flip_rate_counts_pairs_valid_in_both_orders() -> None:
    per_pair = [["A", "A"], ["A", "B"], ["B", "tie"], ["tie", "tie"], ["A", "invalid"], ["A"]]
    assert stats.flip_rate(per_pair) == pytest.approx(2 / 4)
    assert stats.flip_rate([["A"], ["B"]]) is None


def test_summary_fields() -> None:
    winners = ["A", "A", "B", "tie", "invalid"]
    s = stats.summarize(
        winners,
        [["A", "A"], ["A", "A"], ["B", "B"], ["A", "B"], ["A", "invalid"]],
        n_boot=500,
        seed=1,
    )
    assert (s["wins"], s["ties"], s["losses"], s["invalid"]) == (2, 1, 1, 1)
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert s["win_rate_no_ties"] == pytest.approx(2 / 3)
    lo, hi = s["ci95"]
    assert 0.0 <= lo <= s["win_rate"] <= hi <= 1.0
    assert s["flip_rate"] == pytest.approx(1 / 4)


def test_bootstrap_is_seeded_and_degenerate_cases() -> None:
    winners = ["A", "B", "tie", "A", "A", "B"] * 5
    assert stats.bootstrap_ci(winners, n_boot=300, seed=3) == stats.bootstrap_ci(
        winners, n_boot=300, seed=3
    )
    assert stats.bootstrap_ci(["A"] * 10, n_boot=200) == (1.0, 1.0)
    assert stats.bootstrap_ci(["invalid"], n_boot=200) is None
    assert stats.bootstrap_ci(["tie", "tie"], n_boot=200, ties=False) is None


def test_bootstrap_interval_covers_the_true_win_rate() -> None:
    """Synthetic case: P(A)=0.5, P(tie)=0.2, P(B)=0.3, so the true win rate is 0.6."""
    rng = np.random.default_rng(0)
    reps, n, hits, hits_nt = 300, 120, 0, 0
    true_nt = 0.5 / 0.8
    for r in range(reps):
        winners = list(rng.choice(["A", "tie", "B"], size=n, p=[0.5, 0.2, 0.3]))
        lo, hi = stats.bootstrap_ci(winners, n_boot=800, seed=r)
        hits += lo <= 0.6 <= hi
        lo, hi = stats.bootstrap_ci(winners, n_boot=800, seed=r, ties=False)
        hits_nt += lo <= true_nt <= hi
    # Nominal 95%; a percentile bootstrap at n=120 lands within a few points of it.
    assert 0.89 <= hits / reps <= 0.99
    assert 0.89 <= hits_nt / reps <= 0.99


def test_random_orders_are_seeded_per_pair() -> None:
    pairs = [Pair(i, f"p{i}", "a", "b") for i in range(200)]
    first = [orders_for(p, "random", 7) for p in pairs]
    assert first == [orders_for(p, "random", 7) for p in pairs]
    assert first != [orders_for(p, "random", 8) for p in pairs]
    shown_first = [o[0][0] for o in first]
    assert 70 < shown_first.count("A") < 130  # both orders are used, roughly evenly
    assert orders_for(pairs[0], "both", 7) == ["AB", "BA"]


def test_prices_and_spend() -> None:
    prices = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4o-2024-05-13": (5.0, 15.0)}
    assert price_for("gpt-4o-2024-05-13", prices) == (5.0, 15.0)
    assert price_for("gpt-4o-mini-2024-07-18", prices) == (0.15, 0.6)  # longest prefix
    assert price_for("gpt-4o-2024-08-06", prices) == (2.5, 10.0)
    assert price_for("llama-3", prices) is None
    assert cost_usd(1_000_000, 100_000, (5.0, 15.0)) == pytest.approx(6.5)
    spend = Spend(price=(5.0, 15.0))
    spend.add(100_000, 10_000)
    assert spend.usd == pytest.approx(0.65)
    assert spend.would_exceed(0.7, 0.06) and not spend.would_exceed(0.7, 0.04)
    spend.reserved_usd = 0.04
    assert spend.would_exceed(0.7, 0.02)
    assert not Spend(price=None).would_exceed(None, 1e9)
