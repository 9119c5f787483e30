"""One judge run: plan the judgements, reuse what is done, request the rest, write the results.

Resumability has two layers. Every successful reply goes to the cache the moment it arrives,
and every finished pair is appended to `--out` at once. A rerun first takes pairs already in
`--out` (same settings, by fingerprint), then judgements in the cache, and only then asks the
API, so a killed run repeats no finished judgement. At the end `--out` is rewritten in input
order (atomically) and `<out>.summary.json` is written next to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wprctl.judge import stats
from wprctl.judge.cache import CachedReply, JudgeCache, cache_key
from wprctl.judge.client import (
    ClientSettings,
    ClientStats,
    FatalAPIError,
    JudgeClient,
    Outcome,
    UnreachableAPIError,
)
from wprctl.judge.cost import Spend, cost_usd, estimate_tokens
from wprctl.judge.io import Pair, read_jsonl, write_json_atomic, write_jsonl_atomic
from wprctl.judge.parse import parse_verdict
from wprctl.judge.templates import JudgeTemplate

ORDERS = ("AB", "BA")
Progress = Callable[[int, Spend], None]  # (judgements just finished, spend so far)


def summary_path(out: str | Path) -> Path:
    """`<out>.summary.json`, next to the per-pair output."""
    p = Path(out)
    return p.with_name(p.name + ".summary.json")


@dataclass(frozen=True)
class RunSettings:
    # the configured base URL ("" = the client's default, api.openai.com); for the demo's
    # built-in oracle its placeholder, not the port it happens to be served on
    endpoint: str
    model: str
    temperature: float
    orders: str  # "both" | "random"
    seed: int
    max_cost: float | None
    bootstrap: int
    price: tuple[float, float] | None


@dataclass
class Judgement:
    """One order of one pair: what to send, and where its answer lives in the cache."""

    order: str
    messages: list[dict[str, str]]
    key: str
    est_prompt_tokens: int


@dataclass
class PairPlan:
    index: int
    pair: Pair
    judgements: list[Judgement]
    fingerprint: str


def orders_for(pair: Pair, mode: str, seed: int) -> list[str]:
    if mode == "both":
        return list(ORDERS)
    # Seeded per id, so a pair's order does not depend on which other pairs are in the run.
    return [random.Random(f"{seed}:{pair.key}").choice(ORDERS)]


def plan(pairs: list[Pair], template: JudgeTemplate, s: RunSettings) -> list[PairPlan]:
    plans = []
    for i, pair in enumerate(pairs):
        judgements = []
        for order in orders_for(pair, s.orders, s.seed):
            first, second = (
                (pair.response_a, pair.response_b)
                if order == "AB"
                else (pair.response_b, pair.response_a)
            )
            messages = template.render(pair.prompt, first, second)
            key = cache_key(
                endpoint=s.endpoint,
                model=s.model,
                temperature=s.temperature,
                template=template.fingerprint,
                prompt=pair.prompt.strip(),
                first=first.strip(),
                second=second.strip(),
            )
            judgements.append(Judgement(order, messages, key, estimate_tokens(messages)))
        fp = hashlib.sha256(json.dumps([j.key for j in judgements]).encode()).hexdigest()[:24]
        plans.append(PairPlan(i, pair, judgements, fp))
    return plans


def model_verdict(letter: str | None, order: str) -> str:
    """Shown-position letter -> the winning model ("A"/"B"), "tie" or "invalid"."""
    if letter is None:
        return "invalid"
    if letter == "E":
        return "tie"
    return order[0] if letter == "A" else order[1]


def verdict_record(
    j: Judgement, reply: CachedReply, source: str, template: JudgeTemplate
) -> dict[str, Any]:
    letter = parse_verdict(reply.text, template.answer)
    return {
        "order": j.order,
        "verdict": model_verdict(letter, j.order),
        "label": letter,
        "raw": reply.text,
        "refusal": reply.refusal,
        "source": source,  # "api" (this run), "cache"
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }


def pair_row(
    p: PairPlan, records: list[dict[str, Any]], s: RunSettings, template: JudgeTemplate
) -> dict[str, Any]:
    failed = [r for r in records if "error" in r]
    row: dict[str, Any] = {
        "id": p.pair.id,
        "prompt": p.pair.prompt,
        "response_a": p.pair.response_a,
        "response_b": p.pair.response_b,
        "winner": None if failed else stats.combine([r["verdict"] for r in records]),
        "status": "failed" if failed else "ok",
        "verdicts": records,
        "model": s.model,
        "template": template.fingerprint,
        "fingerprint": p.fingerprint,
    }
    if failed:
        row["error"] = failed[0]["error"]
    return row


def load_previous(out: Path) -> dict[str, dict[str, Any]]:
    """Finished pairs from an earlier run's `--out`, by fingerprint (later lines win)."""
    if not out.exists():
        return {}
    try:
        rows = read_jsonl(out)
    except Exception:  # a torn last line from a killed run must not block the rerun
        rows = []
        for line in out.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append((0, obj))
    return {
        r["fingerprint"]: r
        for _, r in rows
        if r.get("status") == "ok" and isinstance(r.get("fingerprint"), str)
    }


@dataclass
class Estimate:
    pairs: int
    judgements: int
    reused: int
    cached: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


def estimate(
    plans: list[PairPlan], out: Path, cache_path: Path, template: JudgeTemplate, s: RunSettings
) -> Estimate:
    """What a run would request, without requesting (for `--dry-run`). Writes nothing."""
    previous = load_previous(out)
    cache = JudgeCache(cache_path) if cache_path.exists() else None
    reused = cached = calls = ptoks = 0
    try:
        for p in plans:
            if p.fingerprint in previous:
                reused += len(p.judgements)
                continue
            for j in p.judgements:
                if cache is not None and cache.get(j.key) is not None:
                    cached += 1
                else:
                    calls += 1
                    ptoks += j.est_prompt_tokens
    finally:
        if cache is not None:
            cache.close()
    ctoks = calls * template.expected_completion_tokens
    return Estimate(
        len(plans),
        sum(len(p.judgements) for p in plans),
        reused,
        cached,
        calls,
        ptoks,
        ctoks,
        cost_usd(ptoks, ctoks, s.price),
    )


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failed: int
    stopped: str | None
    fatal: str | None = None
    unreachable: bool = False  # fatal because no request ever reached the API


@dataclass
class _State:
    spend: Spend
    stop_reason: str | None = None
    fatal: str | None = None
    unreachable: bool = False
    cache_hits: int = 0
    reused_pairs: int = 0
    new_rows: list[dict[str, Any]] = field(default_factory=list)


class Runner:
    def __init__(
        self,
        plans: list[PairPlan],
        template: JudgeTemplate,
        settings: RunSettings,
        client_settings: ClientSettings,
        out: Path,
        cache_path: Path,
    ) -> None:
        self.plans = plans
        self.template = template
        self.s = settings
        self.client_settings = client_settings
        self.out = out
        self.cache_path = cache_path
        self.client_stats: ClientStats | None = None

    # --- the async core ---------------------------------------------------------------------
    async def _judge(
        self, j: Judgement, client: JudgeClient, cache: JudgeCache, st: _State
    ) -> dict[str, Any] | None:
        hit = cache.get(j.key)
        if hit is not None:
            st.cache_hits += 1
            return verdict_record(j, hit, "cache", self.template)
        if st.stop_reason:
            return None
        est = st.spend.estimate(j.est_prompt_tokens, self.template.expected_completion_tokens)
        if st.spend.would_exceed(self.s.max_cost, est):
            st.stop_reason = "max_cost"
            return None
        st.spend.reserved_usd += est
        try:
            outcome: Outcome = await client.complete(
                j.messages,
                model=self.s.model,
                temperature=self.s.temperature,
                max_tokens=self.template.max_tokens,
                estimated_tokens=j.est_prompt_tokens + self.template.expected_completion_tokens,
                seed=self.s.seed,
                stopping=lambda: st.fatal is not None,
            )
        except FatalAPIError as exc:
            if st.fatal is None:
                st.fatal, st.unreachable = str(exc), isinstance(exc, UnreachableAPIError)
            st.stop_reason = "fatal"
            return None
        finally:
            st.spend.reserved_usd -= est
        if outcome.skipped:
            return None
        if not outcome.ok:
            return {"order": j.order, "error": outcome.error, "attempts": outcome.attempts}
        st.spend.add(outcome.prompt_tokens, outcome.completion_tokens)
        reply = CachedReply(
            outcome.text or "", outcome.refusal, outcome.prompt_tokens, outcome.completion_tokens
        )
        cache.put(j.key, self.s.model, reply)
        return verdict_record(j, reply, "api", self.template)

    async def _pair(
        self,
        p: PairPlan,
        client: JudgeClient,
        cache: JudgeCache,
        st: _State,
        sink: Any,
        progress: Progress,
    ) -> None:
        async def one(j: Judgement) -> dict[str, Any] | None:
            record = await self._judge(j, client, cache, st)
            if record is not None:
                progress(1, st.spend)
            return record

        records = await asyncio.gather(*(one(j) for j in p.judgements))
        if any(r is None for r in records):
            return  # stopped before this pair finished: left for the rerun
        row = pair_row(p, list(records), self.s, self.template)  # type: ignore[arg-type]
        st.new_rows.append(row)
        if row["status"] == "ok":
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()

    async def _run_async(self, todo: list[PairPlan], st: _State, progress: Progress) -> None:
        client = JudgeClient(self.client_settings)
        cache = JudgeCache(self.cache_path)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.out.open("a", encoding="utf-8") as sink:
                await asyncio.gather(
                    *(self._pair(p, client, cache, st, sink, progress) for p in todo)
                )
        finally:
            self.client_stats = client.stats
            await client.close()
            cache.close()

    # --- the run ----------------------------------------------------------------------------
    def run(
        self,
        progress: Progress = lambda n, spend: None,
        extra_summary: dict[str, Any] | None = None,
    ) -> RunResult:
        previous = load_previous(self.out)
        st = _State(spend=Spend(price=self.s.price))
        done: dict[int, dict[str, Any]] = {}
        todo = []
        for p in self.plans:
            row = previous.get(p.fingerprint)
            if row is not None:
                done[p.index] = row
                st.reused_pairs += 1
                progress(len(p.judgements), st.spend)
            else:
                todo.append(p)
        if previous and done:
            # Rewrite first so a stale or torn earlier output never mixes with this run's lines.
            write_jsonl_atomic(self.out, [done[i] for i in sorted(done)])
        elif self.out.exists():
            self.out.unlink()
        if todo:
            asyncio.run(self._run_async(todo, st, progress))
        index = {p.fingerprint: p.index for p in self.plans}
        for row in st.new_rows:
            done[index[row["fingerprint"]]] = row
        rows = [done[i] for i in sorted(done)]
        write_jsonl_atomic(self.out, rows)
        summary = self._summary(rows, st, extra_summary or {})
        write_json_atomic(summary_path(self.out), summary)
        failed = sum(r["status"] == "failed" for r in rows)
        return RunResult(rows, summary, failed, st.stop_reason, st.fatal, st.unreachable)

    def _summary(
        self, rows: list[dict[str, Any]], st: _State, extra: dict[str, Any]
    ) -> dict[str, Any]:
        ok = [r for r in rows if r["status"] == "ok"]
        body = stats.summarize(
            [r["winner"] for r in ok],
            [[v["verdict"] for v in r["verdicts"]] for r in ok],
            n_boot=self.s.bootstrap,
            seed=self.s.seed,
        )
        all_records = [v for r in ok for v in r["verdicts"]]
        tot_p = sum(v.get("prompt_tokens", 0) for v in all_records)
        tot_c = sum(v.get("completion_tokens", 0) for v in all_records)
        cs = self.client_stats
        pending = len(self.plans) - len(rows)
        stopped = st.stop_reason
        return {
            **extra,
            "model": self.s.model,
            "template": self.template.fingerprint,
            "orders": self.s.orders,
            **body,
            "pairs": len(self.plans),
            "judged": len(ok),
            "failed": len(rows) - len(ok),
            "pending": pending,
            "complete": pending == 0 and len(rows) == len(ok),
            "stopped": stopped,
            "stop_message": _stop_message(stopped, st, self.s),
            "refusals": sum(bool(v.get("refusal")) for v in all_records),
            "requests": cs.requests if cs else 0,
            "retries": cs.retries if cs else 0,
            "rate_limited": cs.rate_limited if cs else 0,
            "reused_pairs": st.reused_pairs,
            "cache_hits": st.cache_hits,
            "prompt_tokens": st.spend.prompt_tokens,
            "completion_tokens": st.spend.completion_tokens,
            "cost_usd": st.spend.usd,
            "total_prompt_tokens": tot_p,
            "total_completion_tokens": tot_c,
            "total_cost_usd": cost_usd(tot_p, tot_c, self.s.price),
        }


def _stop_message(reason: str | None, st: _State, s: RunSettings) -> str | None:
    if reason == "max_cost":
        return (
            f"stopped before exceeding --max-cost ${s.max_cost:g} "
            f"(spent ${st.spend.usd or 0:.4f}); rerun with a higher limit to finish"
        )
    if reason == "fatal" and st.unreachable:
        return f"stopped: cannot connect to the API ({st.fatal})"
    if reason == "fatal":
        return f"stopped: the API rejected the requests ({st.fatal})"
    return None
