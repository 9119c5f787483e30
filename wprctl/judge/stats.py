"""Pure functions for pairwise judging: combining both orders, counting, win rates, intervals.

Everything is from model A's point of view. A judgement's verdict in *model* terms is "A", "B",
"tie" or "invalid" (the runner maps the judge's shown-position letters through the order).

Both-orders rule (the issue's): the same winner in both orders wins; a tie in either order or two
disagreeing winners is a tie; if either order is invalid the pair is invalid, because the
consistency check it exists for cannot be made. Invalid pairs are reported and excluded from every
rate: they are never counted as losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINNERS = ("A", "B", "tie", "invalid")
SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}


def combine(verdicts: Sequence[str]) -> str:
    """The pair's winner from its per-order verdicts (one order or two)."""
    if not verdicts or any(v == "invalid" for v in verdicts):
        return "invalid"
    if any(v not in ("A", "B", "tie") for v in verdicts):
        raise ValueError(f"unknown verdict in {list(verdicts)}")
    first = verdicts[0]
    if first != "tie" and all(v == first for v in verdicts):
        return first
    return "tie"


def flipped(verdicts: Sequence[str]) -> bool | None:
    """Whether swapping the order changed the verdict; None if not judged validly in both."""
    if len(verdicts) != 2 or "invalid" in verdicts:
        return None
    return verdicts[0] != verdicts[1]


@dataclass(frozen=True)
class Counts:
    wins: int
    ties: int
    losses: int
    invalid: int

    @property
    def valid(self) -> int:
        return self.wins + self.ties + self.losses


def count(winners: Sequence[str]) -> Counts:
    return Counts(
        wins=sum(w == "A" for w in winners),
        ties=sum(w == "tie" for w in winners),
        losses=sum(w == "B" for w in winners),
        invalid=sum(w == "invalid" for w in winners),
    )


def win_rate(c: Counts) -> float | None:
    """Ties count as half a win."""
    return (c.wins + 0.5 * c.ties) / c.valid if c.valid else None


def win_rate_no_ties(c: Counts) -> float | None:
    """The paper's way: ties are dropped, wins / (wins + losses)."""
    decided = c.wins + c.losses
    return c.wins / decided if decided else None


def flip_rate(per_pair_verdicts: Sequence[Sequence[str]]) -> float | None:
    flags = [f for f in (flipped(v) for v in per_pair_verdicts) if f is not None]
    return sum(flags) / len(flags) if flags else None


def bootstrap_ci(
    winners: Sequence[str],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    ties: bool = True,
) -> tuple[float, float] | None:
    """Paired percentile bootstrap interval for the win rate.

    The resampling unit is the pair (one prompt, both models' responses, all its verdicts), so the
    interval reflects prompt-to-prompt variation. `ties=False` gives the interval of the no-ties
    rate over the same resamples; a resample with no decided pair has no such rate and is dropped.
    """
    scores = np.array([SCORE[w] for w in winners if w in SCORE], dtype=float)
    n = scores.size
    if n == 0 or (not ties and not np.any(scores != 0.5)):
        return None
    rng = np.random.default_rng(seed)
    sample = scores[rng.integers(0, n, size=(n_boot, n))]
    if ties:
        rates = sample.mean(axis=1)
    else:
        decided = (sample != 0.5).sum(axis=1)
        wins = (sample == 1.0).sum(axis=1)
        rates = wins[decided > 0] / decided[decided > 0]
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(rates, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(
    winners: Sequence[str],
    per_pair_verdicts: Sequence[Sequence[str]],
    *,
    n_boot: int,
    seed: int,
) -> dict[str, object]:
    """The statistics part of `<out>.summary.json`."""
    c = count(winners)
    ci = bootstrap_ci(winners, n_boot=n_boot, seed=seed)
    ci_nt = bootstrap_ci(winners, n_boot=n_boot, seed=seed, ties=False)
    return {
        "pairs": len(winners),
        "wins": c.wins,
        "ties": c.ties,
        "losses": c.losses,
        "invalid": c.invalid,
        "win_rate": win_rate(c),
        "win_rate_no_ties": win_rate_no_ties(c),
        "ci95": list(ci) if ci else None,
        "ci95_no_ties": list(ci_nt) if ci_nt else None,
        "flip_rate": flip_rate(per_pair_verdicts),
    }
