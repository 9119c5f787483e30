"""The request layer against a real local OpenAI-compatible server, through the official client."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import threading
import time

import pytest

from wprctl.judge.client import (
    ClientSettings,
    FatalAPIError,
    JudgeClient,
    Outcome,
    RateLimiter,
    UnreachableAPIError,
    backoff_delay,
    retry_after_seconds,
)
from wprctl.judge.server import JudgeServer, Reply, fail_first

KEY = "sk-client-test"


@pytest.fixture
def server(judge_server: JudgeServer) -> JudgeServer:
    return judge_server


def ask(server: JudgeServer, prompts: list[str], **settings: object) -> list[Outcome]:
    """Send one request per prompt concurrently; return the outcomes in order."""
    defaults: dict[str, object] = {"timeout": 5.0, "max_retries": 3, "backoff_base": 0.02}
    defaults.update(settings)

    async def main() -> list[Outcome]:
        client = JudgeClient(ClientSettings(base_url=server.base_url, api_key=KEY, **defaults))  # type: ignore[arg-type]
        try:
            return await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": p}],
                        model="judge",
                        temperature=0.0,
                        max_tokens=8,
                        estimated_tokens=20,
                    )
                    for p in prompts
                )
            )
        finally:
            await client.close()

    return asyncio.run(main())


def test_scripted_verdicts_and_usage(server: JudgeServer) -> None:
    server.responder = lambda messages, model: {"p1": "A", "p2": "**B**", "p3": "E (equal)"}[
        messages[-1]["content"]
    ]
    outcomes = ask(server, ["p1", "p2", "p3"])
    assert [o.text for o in outcomes] == ["A", "**B**", "E (equal)"]
    assert all(o.ok and o.attempts == 1 and o.prompt_tokens >= 1 for o in outcomes)
    assert server.requests == 3 and server.api_keys_seen == {KEY}


def test_429_honours_retry_after(server: JudgeServer) -> None:
    server.responder = fail_first(1, Reply.rate_limited(retry_after=0.6), lambda m, model: "A")
    start = time.monotonic()
    (outcome,) = ask(server, ["p"], backoff_base=0.01)
    elapsed = time.monotonic() - start
    assert outcome.ok and outcome.text == "A" and outcome.attempts == 2
    # Backoff alone would have waited ~0.01 s; the server asked for 0.6 s.
    assert elapsed >= 0.6
    assert server.count("p") == 2


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after_seconds({"retry-after": future}) or 0) <= 31
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_backoff_is_exponential_with_bounded_jitter() -> None:
    rng = random.Random(0)
    for attempt in range(8):
        step = min(10.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 10.0, rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 40  # jittered, not constant


def test_500s_are_retried_then_succeed(server: JudgeServer) -> None:
    server.responder = fail_first(2, Reply.server_error(500), lambda m, model: "B")
    (outcome,) = ask(server, ["p"])
    assert outcome.ok and outcome.text == "B" and outcome.attempts == 3
    assert server.count("p") == 3


def test_retry_limit_gives_a_failed_outcome(server: JudgeServer) -> None:
    server.responder = lambda m, model: Reply.server_error(503)
    (outcome,) = ask(server, ["p"], max_retries=2)
    assert not outcome.ok and "503" in (outcome.error or "")
    assert outcome.attempts == 3 and server.count("p") == 3


def test_timeouts_are_retried(server: JudgeServer) -> None:
    server.responder = fail_first(1, Reply.hang(2.0), lambda m, model: "A")
    start = time.monotonic()
    (outcome,) = ask(server, ["p"], timeout=0.4)
    assert outcome.ok and outcome.text == "A" and outcome.attempts == 2
    assert 0.4 <= time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "body",
    [b'{"id": "x", "choices": [{"message": ', b"<html>bad gateway</html>", b'{"unexpected": 1}'],
)
def test_malformed_bodies_are_retried(server: JudgeServer, body: bytes) -> None:
    server.responder = fail_first(1, Reply.malformed(body), lambda m, model: "E")
    (outcome,) = ask(server, ["p"])
    assert outcome.ok and outcome.text == "E" and outcome.attempts == 2
    server.responder = lambda m, model: Reply.malformed(body)
    (outcome,) = ask(server, ["q"], max_retries=1)
    assert not outcome.ok and "malformed" in (outcome.error or "")


def test_refusals_are_replies_not_errors(server: JudgeServer) -> None:
    server.responder = lambda m, model: Reply.refused("I can't help with that.")
    (outcome,) = ask(server, ["p"])
    assert outcome.ok and outcome.refusal and outcome.text == "I can't help with that."
    assert outcome.attempts == 1


def test_bad_request_is_not_retried_and_auth_failure_is_fatal(server: JudgeServer) -> None:
    server.responder = lambda m, model: Reply(
        status=400, body=b'{"error": {"message": "too long"}}'
    )
    (outcome,) = ask(server, ["p"])
    assert not outcome.ok and outcome.attempts == 1 and "400" in (outcome.error or "")
    server.responder = lambda m, model: Reply(
        status=401, body=json.dumps({"error": {"message": f"bad key {KEY}"}}).encode()
    )
    with pytest.raises(FatalAPIError) as info:
        ask(server, ["q"])
    assert KEY not in str(info.value)  # a server echoing the key does not leak it


def _closed_url() -> str:
    gone = JudgeServer()
    gone.start()
    url = gone.base_url
    gone.stop()  # nothing listens there now: connections are refused
    return url


def test_an_api_never_reached_is_given_up_after_a_few_refused_connections() -> None:
    nowhere = type("Nowhere", (), {"base_url": _closed_url()})()
    with pytest.raises(UnreachableAPIError) as info:
        ask(nowhere, ["p", "q"], max_retries=6)  # type: ignore[arg-type]
    assert "Connection" in str(info.value)


def test_once_the_api_answered_refused_connections_are_retried_not_fatal() -> None:
    # "Connection: close": the client cannot reuse a kept-alive connection after the stop
    server = JudgeServer(lambda m, model: Reply(text="A", headers={"Connection": "close"}))
    server.start()
    settings = ClientSettings(
        base_url=server.base_url, api_key=KEY, timeout=5.0, max_retries=4, backoff_base=0.02
    )

    async def main() -> tuple[Outcome, Outcome]:
        client = JudgeClient(settings)
        try:
            msg = [{"role": "user", "content": "p"}]
            kw = {"model": "judge", "temperature": 0.0, "max_tokens": 8, "estimated_tokens": 20}
            first = await client.complete(msg, **kw)  # type: ignore[arg-type]
            server.stop()
            return first, await client.complete(msg, **kw)  # type: ignore[arg-type]
        finally:
            await client.close()

    first, second = asyncio.run(main())
    assert first.ok and not second.ok and second.attempts == 5
    assert "Connection" in (second.error or "")


def test_concurrency_limit(server: JudgeServer) -> None:
    lock, active, peak = threading.Lock(), [0], [0]

    def responder(messages: list, model: str) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return "A"

    server.responder = responder
    outcomes = ask(server, [f"p{i}" for i in range(12)], concurrency=3)
    assert all(o.ok for o in outcomes)
    assert peak[0] == 3


def test_requests_per_minute_limit(server: JudgeServer) -> None:
    start = time.monotonic()
    outcomes = ask(server, [f"p{i}" for i in range(20)], requests_per_minute=600, concurrency=20)
    # 10/s with a one-second bucket: the first 10 go at once, the next 10 over ~1 s.
    assert all(o.ok for o in outcomes)
    assert time.monotonic() - start >= 0.9


def test_rate_limiter_long_run_rate_for_large_requests() -> None:
    async def main() -> float:
        limiter = RateLimiter(per_minute=6000)  # 100 tokens/s, bucket of 100
        start = time.monotonic()
        for _ in range(4):
            await limiter.acquire(25)  # 100 tokens: 100 from the bucket, no wait... yet
        await limiter.acquire(25)  # the bucket is empty: ~0.25 s
        await limiter.acquire(150)  # larger than the bucket: admitted when full (~1 s), then owed
        await limiter.acquire(1)  # waits out the 50-token debt: ~0.5 s
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert 1.7 <= elapsed < 2.6
