"""Prices, token estimates and spend accounting for judge runs.

Prices are USD per million (prompt, completion) tokens from `judge.prices`. A model missing from
the table takes the price of its longest listed prefix ("gpt-4o-2024-08-06" -> "gpt-4o"), because
dated snapshots are priced like their family; with no match the cost is unknown (None).

Token estimates (for `--dry-run`, the tokens-per-minute limiter and the `--max-cost` guard before
a request is sent) use ~4 characters per token plus a small per-message overhead, the usual rule of
thumb for English with OpenAI tokenizers. Actual spend always uses the usage the API reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_OVERHEAD_TOKENS = 3

Price = tuple[float, float]


def price_for(model: str, prices: Mapping[str, Sequence[float]]) -> Price | None:
    if model in prices:
        p = prices[model]
        return float(p[0]), float(p[1])
    matches = [name for name in prices if model.startswith(name)]
    if not matches:
        return None
    p = prices[max(matches, key=len)]
    return float(p[0]), float(p[1])


def estimate_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    chars = sum(len(m.get("content", "")) for m in messages)
    return (
        math.ceil(chars / CHARS_PER_TOKEN)
        + MESSAGE_OVERHEAD_TOKENS * len(messages)
        + REPLY_OVERHEAD_TOKENS
    )


def cost_usd(prompt_tokens: int, completion_tokens: int, price: Price | None) -> float | None:
    if price is None:
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


@dataclass
class Spend:
    """Running totals for one run, plus a reservation for requests in flight (for `--max-cost`)."""

    price: Price | None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved_usd: float = 0.0

    @property
    def usd(self) -> float | None:
        return cost_usd(self.prompt_tokens, self.completion_tokens, self.price)

    def estimate(self, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(prompt_tokens, completion_tokens, self.price) or 0.0

    def would_exceed(self, budget: float | None, next_usd: float) -> bool:
        if budget is None:
            return False
        return (self.usd or 0.0) + self.reserved_usd + next_usd > budget

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
