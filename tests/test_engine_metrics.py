"""Metric means over ranks (`engine.all_reduce_mean`) when ranks report different metrics: two
gloo ranks, as under the launcher."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from tests.conftest import run_gloo_ranks
from wprctl import engine as eng

# A PPO rank whose whole batch was dropped reports timers and training losses (from the reused
# experience) but no reward; the other rank reports everything. Keys are in different orders.
REPORTS = [
    {"reward": 1.0, "time/generation": 0.5, "policy_loss": 2.0, "penalty": -3.0},
    {"policy_loss": 4.0, "time/generation": 1.5, "gold": 7.0},
]


def _report(out: str, rank: int) -> None:
    result = eng.all_reduce_mean(REPORTS[rank])
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def test_each_metric_is_averaged_over_the_ranks_that_report_it(tmp_path: Path) -> None:
    out = str(tmp_path / "m")
    run_gloo_ranks(partial(_report, out))
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert (
        results[0]
        == results[1]
        == {
            "gold": 7.0,  # rank 1 only
            "penalty": -3.0,  # rank 0 only
            "policy_loss": 3.0,
            "reward": 1.0,
            "time/generation": 1.0,
        }
    )


def test_one_process_returns_its_own_metrics() -> None:
    assert eng.all_reduce_mean(REPORTS[1]) == REPORTS[1]
