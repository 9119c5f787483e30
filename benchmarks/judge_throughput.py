"""Judge throughput: 50 pairs x 2 orders against a local server with 200 ms latency.

    python -m benchmarks.judge_throughput [--pairs 50] [--latency 0.2] [--concurrency 16]

Runs the real judge path (templates, openai client, retries, cache, output, summary) in a
temporary directory against `JudgeServer`, whose responder recovers the texts from the rendered
prompt and prefers the longer response. Target: <= 10 s at concurrency 16. A second run over the
same output measures the resume path (all pairs reused, zero requests).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from wprctl.judge.client import ClientSettings
from wprctl.judge.io import Pair
from wprctl.judge.run import Runner, RunSettings, plan
from wprctl.judge.server import JudgeServer
from wprctl.judge.templates import load_template, match_builtin

TARGET_SECONDS = 10.0


def longer_is_better(messages: list, model: str) -> str:
    template, (_prompt, first, second) = match_builtin(messages[-1]["content"])
    return template.format_answer("A" if len(first) >= len(second) else "B")


def make_pairs(n: int) -> list[Pair]:
    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "judge"
    a = [json.loads(x) for x in (fixture / "tldr_a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (fixture / "tldr_b.jsonl").read_text().splitlines()]
    return [
        Pair(
            f"{i}",
            a[i % len(a)]["prompt"] + f" [{i}]",
            a[i % len(a)]["response"],
            b[i % len(b)]["response"],
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    template = load_template("summarize")
    settings = RunSettings(
        endpoint="local-judge-benchmark",
        model="local-judge",
        temperature=0.0,
        orders="both",
        seed=0,
        max_cost=None,
        bootstrap=10000,
        price=None,
    )
    plans = plan(make_pairs(args.pairs), template, settings)
    judgements = sum(len(p.judgements) for p in plans)
    with tempfile.TemporaryDirectory() as tmp, JudgeServer(longer_is_better, args.latency) as url:
        out = Path(tmp) / "judged.jsonl"
        client = ClientSettings(
            base_url=url, api_key="sk-local-no-key", concurrency=args.concurrency, timeout=30.0
        )
        start = time.perf_counter()
        result = Runner(plans, template, settings, client, out, Path(tmp) / "cache.sqlite").run()
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        again = Runner(plans, template, settings, client, out, Path(tmp) / "cache.sqlite").run()
        resume = time.perf_counter() - start

    floor = judgements * args.latency / args.concurrency
    print(
        f"judge throughput: {args.pairs} pairs x 2 orders = {judgements} requests, "
        f"latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}"
    )
    print(
        f"  wall time        {elapsed:6.2f} s   (target <= {TARGET_SECONDS:.0f} s; "
        f"latency-bound floor {floor:.2f} s)"
    )
    print(f"  throughput       {judgements / elapsed:6.1f} requests/s")
    print(f"  requests sent    {result.summary['requests']}   failed pairs {result.failed}")
    print(f"  win rate (A)     {result.summary['win_rate']:.3f}")
    print(f"  resume rerun     {resume:6.2f} s   requests sent {again.summary['requests']}")
    print(f"  verdict: {'PASS' if elapsed <= TARGET_SECONDS else 'FAIL'}")


if __name__ == "__main__":
    main()
