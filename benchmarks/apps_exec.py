"""APPS execution throughput with the sandbox on: samples/s and tests/s.

    python -m benchmarks.apps_exec [--problems FILE] [--n 3] [--workers N] [--timeout 10]

Runs the shipped real APPS problems with their own reference solutions (n per problem, cycling
through each problem's solutions), once with one worker (the per-core figure) and once with one
worker per core. Sandbox start-up is timed apart; throughput is measured on started sandboxes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from wprctl.codeexec import (
    ExecConfig,
    ExecPool,
    evaluate_samples,
    load_problems,
    reference_generations,
)
from wprctl.codeexec.sandbox import probe_isolation

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROBLEMS = ROOT / "tests" / "fixtures" / "apps" / "apps.jsonl"


def measure(problems, samples, config: ExecConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    with ExecPool(config) as pool:
        # one tiny program per sandbox starts them all
        warm_id = next(iter(problems))
        evaluate_samples(
            problems, [(warm_id, "pass")] * config.n_workers, pool=pool, progress=False
        )
        t1 = time.perf_counter()
        results = evaluate_samples(problems, samples, pool=pool, progress=False)
        t2 = time.perf_counter()
    n_tests = sum(r.total for r in results)
    return {
        "workers": config.n_workers,
        "startup_s": t1 - t0,
        "seconds": t2 - t1,
        "samples": len(results),
        "tests": n_tests,
        "samples_per_s": len(results) / (t2 - t1),
        "tests_per_s": n_tests / (t2 - t1),
        "all_pass": sum(r.all_passed for r in results),
        "cpu_in_programs_s": sum(sum(r.times) for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", default=str(DEFAULT_PROBLEMS))
    ap.add_argument("--n", type=int, default=3, help="samples per problem")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--mode", default="compat", choices=["compat", "strict"])
    args = ap.parse_args()

    problems = load_problems(args.problems)
    rows = reference_generations(problems, args.n)
    samples = [(r["id"], r["response"]) for r in rows]
    base = ExecConfig(timeout=args.timeout, mode=args.mode)
    print(f"problems: {len(problems)}  samples: {len(samples)}  mode: {args.mode}")
    print(f"sandbox: {probe_isolation(base.sandbox).describe()}")
    print(f"cores visible: {len(os.sched_getaffinity(0))}  load average: {os.getloadavg()[0]:.2f}")
    print(
        f"{'workers':>7} {'start s':>8} {'run s':>7} {'samples/s':>10} {'tests/s':>9} "
        f"{'samples/s/worker':>17} {'all pass':>9}"
    )
    for workers in dict.fromkeys([1, args.workers]):
        m = measure(problems, samples, base.with_(workers=workers))
        print(
            f"{m['workers']:>7} {m['startup_s']:>8.2f} {m['seconds']:>7.2f} {m['samples_per_s']:>10.1f} "
            f"{m['tests_per_s']:>9.1f} {m['samples_per_s'] / workers:>17.1f} "
            f"{m['all_pass']:>5}/{m['samples']}"
        )
    print("target: >= 17 samples/s per core with the sandbox on (human-eval: 8.5 per worker)")


if __name__ == "__main__":
    main()
