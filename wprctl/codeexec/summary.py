"""The numbers `apps-eval` reports: pass@k, strict accuracy, test-case average, per difficulty.

Each problem counts once: a problem's strict accuracy is the fraction of its samples passing all
tests, its test-case average the mean fraction of tests passed per sample; both are then averaged
over problems (with one sample per problem these are exactly the APPS paper's metrics).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from wprctl.codeexec.executor import SampleResult
from wprctl.codeexec.passk import mean, mean_pass_at_k
from wprctl.codeexec.problems import DIFFICULTIES


def group_metrics(results: Sequence[SampleResult], ks: Sequence[int]) -> dict[str, Any]:
    by_problem: dict[str, list[SampleResult]] = defaultdict(list)
    for r in results:
        by_problem[r.problem_id].append(r)
    counts = [(len(rs), sum(r.all_passed for r in rs)) for rs in by_problem.values()]
    passk: dict[str, float | None] = {}
    used: dict[str, int] = {}
    for k in ks:
        passk[str(k)], used[str(k)] = mean_pass_at_k(counts, k)
    out: dict[str, Any] = {
        "n_problems": len(by_problem),
        "n_samples": len(results),
        "n_tests": sum(r.total for r in results),
        "pass@k": passk,
        "pass@k_problems": used,
        "strict_accuracy": mean(
            [mean([float(r.all_passed) for r in rs]) for rs in by_problem.values()]
        ),
        "test_case_average": mean(
            [mean([r.pass_fraction for r in rs]) for rs in by_problem.values()]
        ),
        "mean_reward": mean([r.reward for r in results]),
        "verdicts": dict(Counter(v for r in results for v in r.verdicts)),
    }
    return out


def summarize(results: Sequence[SampleResult], ks: Sequence[int], **extra: Any) -> dict[str, Any]:
    summary = group_metrics(results, ks)
    skipped = [k for k in ks if summary["pass@k_problems"][str(k)] < summary["n_problems"]]
    if skipped:
        summary["pass@k_note"] = (
            "pass@k averages only problems with at least k samples: "
            + ", ".join(
                f"pass@{k} over {summary['pass@k_problems'][str(k)]}/{summary['n_problems']} problems"
                for k in skipped
            )
        )
    order = [d for d in DIFFICULTIES if any(r.difficulty == d for r in results)]
    order += sorted({r.difficulty for r in results} - set(order))
    summary["by_difficulty"] = {
        d: group_metrics([r for r in results if r.difficulty == d], ks) for d in order
    }
    summary.update(extra)
    return summary
