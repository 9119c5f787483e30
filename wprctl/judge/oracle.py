"""The demo task's gold oracle served as an OpenAI-compatible judge (`--base-url builtin:demo-oracle`).

The demo runs the real judge path (templates, the official `openai` client, retries, cache,
both orders) against a local server on 127.0.0.1 whose "model" reads the two summaries out of
the rendered prompt and answers for the one the gold oracle scores higher (E on a tie).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

BUILTIN_ORACLE = "builtin:demo-oracle"
TIE_MARGIN = 1e-9


def demo_oracle_responder(messages: Sequence[dict[str, Any]], model: str) -> str:
    from wprctl.data import oracle_score
    from wprctl.judge.templates import match_builtin

    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    try:
        template, (prompt, first, second) = match_builtin(str(user))
    except Exception:  # not one of our templates: answer like a model that cannot judge it
        return "I cannot compare these responses."
    a, b = oracle_score(prompt, first), oracle_score(prompt, second)
    choice = "E" if abs(a - b) <= TIE_MARGIN else ("A" if a > b else "B")
    return template.format_answer(
        choice, comparison=f"gold oracle: first {a:+.2f}, second {b:+.2f}"
    )


@contextlib.contextmanager
def serve_builtin(base_url: str | None) -> Iterator[str | None]:
    """Start the oracle server when asked for `builtin:demo-oracle`; pass any other URL through."""
    if base_url != BUILTIN_ORACLE:
        yield base_url
        return
    from wprctl.judge.server import JudgeServer

    with JudgeServer(responder=demo_oracle_responder) as url:
        yield url
