"""The request layer: the official `openai` async client behind our own retry and rate limits.

The SDK's built-in retries are switched off (`max_retries=0`) so that one place decides: which
errors are worth retrying (429, 5xx, 408/409, timeouts, dropped connections, malformed bodies),
how long to wait (exponential backoff with jitter, or the server's `Retry-After`, which also pauses
every other request because a rate limit is shared), and when to give up. Errors that retrying
cannot fix split in two: a bad request fails that judgement only; a rejected key, a forbidden or
unknown model is `FatalAPIError`, which stops the run (every further request would fail alike).
So is an API that no request has ever reached, once connecting has failed `UNREACHABLE_AFTER`
times (a wrong URL, a server that is not running): retrying every pair would take minutes to say
the same thing. Once any request has had an answer, dropped connections are retried as usual.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FATAL_STATUSES = {401, 403, 404}
RETRY_STATUSES = {408, 409, 429}
MAX_RETRY_AFTER = 300.0
# A server still starting may refuse a connection or two.
UNREACHABLE_AFTER = 3


class FatalAPIError(Exception):
    """The API refuses every request (bad key, forbidden, unknown model): stop the run."""


class UnreachableAPIError(FatalAPIError):
    """No request has reached the API, and connecting keeps failing."""


@dataclass
class Outcome:
    """The result of one judgement request after retries."""

    text: str | None = None
    refusal: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error: str | None = None
    skipped: bool = False  # not sent: the run was stopping when its turn came

    @property
    def ok(self) -> bool:
        return self.error is None


class RateLimiter:
    """A token bucket refilled at `per_minute / 60` per second, holding at most one second's worth.

    A request larger than the bucket is admitted when the bucket is full and drives it negative,
    so the long-run rate holds for requests of any size. Waiters are served in arrival order.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float = 1.0) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self.tokens >= need:
                    self.tokens -= amount
                    return
                await asyncio.sleep((need - self.tokens) / self.rate)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half the step fixed, half random.

    The fixed half guarantees real spacing; the random half de-synchronises many clients that
    failed together so they do not retry in lockstep.
    """
    step = min(cap, base * (2**attempt))
    return step / 2 + rng.uniform(0, step / 2)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), if present."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except (AttributeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ClientSettings:
    base_url: str | None
    api_key: str = field(repr=False)  # never shown in a repr, a log line or a traceback
    timeout: float = 60.0
    max_retries: int = 6
    concurrency: int = 8
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    jitter_seed: int | None = None


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class JudgeClient:
    """Chat completions with retries, a concurrency cap and request/token rate limits."""

    def __init__(self, settings: ClientSettings) -> None:
        import openai

        self.settings = settings
        self._openai = openai
        self._client = openai.AsyncOpenAI(
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_retries=0,
        )
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._rpm = (
            RateLimiter(settings.requests_per_minute) if settings.requests_per_minute else None
        )
        self._tpm = RateLimiter(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._rng = random.Random(settings.jitter_seed)
        self._paused_until = 0.0
        self._reached = False  # has any request had an answer (even an error status)?
        self.stats = ClientStats()

    async def close(self) -> None:
        await self._client.close()

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        estimated_tokens: int,
        seed: int | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> Outcome:
        """One judgement: retried until it succeeds, fails for good, or retries run out.

        `stopping` is asked just before each send, once a slot is free: a run that is stopping
        (a fatal error elsewhere) must not fire the requests queued behind the concurrency cap.
        """
        outcome = Outcome()
        attempt = 0
        while True:
            wait = self._paused_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(estimated_tokens)
            outcome.attempts = attempt + 1
            async with self._semaphore:
                if stopping is not None and stopping():
                    outcome.skipped = True
                    return outcome
                self.stats.requests += 1
                try:
                    response = await self._client.chat.completions.create(
                        model=model,
                        messages=messages,  # type: ignore[arg-type]
                        temperature=temperature,
                        max_tokens=max_tokens,
                        **({"seed": seed} if seed is not None else {}),
                    )
                    self._reached = True
                    return self._read(response, outcome)
                except self._openai.APIStatusError as exc:
                    self._reached = True
                    status = exc.status_code
                    message = self._redact(f"HTTP {status}: {exc.message}")
                    if status in FATAL_STATUSES:
                        raise FatalAPIError(message) from None
                    retryable = status in RETRY_STATUSES or status >= 500
                    server_wait = retry_after_seconds(getattr(exc.response, "headers", None))
                    if status == 429:
                        self.stats.rate_limited += 1
                except (self._openai.APITimeoutError, self._openai.APIConnectionError) as exc:
                    message = self._redact(f"{type(exc).__name__}: {exc}")
                    retryable, server_wait = True, None
                    # a timeout may be a slow server; a refused connection is no server at all
                    refused = not isinstance(exc, self._openai.APITimeoutError)
                    if refused and not self._reached and attempt + 1 >= UNREACHABLE_AFTER:
                        raise UnreachableAPIError(message) from None
                except Exception as exc:  # a body the SDK could not decode
                    message = self._redact(f"malformed response: {type(exc).__name__}: {exc}")
                    retryable, server_wait = True, None
            kind = message.split(":", 1)[0]
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
            if not retryable or attempt >= self.settings.max_retries:
                outcome.error = message
                return outcome
            if server_wait is not None:
                delay = min(server_wait, MAX_RETRY_AFTER) * (1 + self._rng.uniform(0, 0.1))
                # A Retry-After speaks for the whole key, not just this request.
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            else:
                delay = backoff_delay(
                    attempt, self.settings.backoff_base, self.settings.backoff_max, self._rng
                )
            self.stats.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    def _read(self, response: Any, outcome: Outcome) -> Outcome:
        """Text, refusal flag and usage from a completion; anything else is a malformed body."""
        try:
            choice = response.choices[0]
            message = choice.message
            content = message.content
            refusal = getattr(message, "refusal", None)
            finish = getattr(choice, "finish_reason", None)
        except (AttributeError, IndexError, TypeError, KeyError):
            raise ValueError(f"not a chat completion: {str(response)[:200]!r}") from None
        if content is not None and not isinstance(content, str):
            raise ValueError("message content is not text")
        usage = getattr(response, "usage", None)
        outcome.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        outcome.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        outcome.finish_reason = finish
        if refusal:
            outcome.text, outcome.refusal = str(refusal), True
        else:
            outcome.text = content or ""
            outcome.refusal = finish == "content_filter"
        return outcome
