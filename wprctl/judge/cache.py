"""The on-disk judgement cache: one SQLite row per successful judge reply.

Keyed by what determines the reply: the endpoint (the configured base URL: two servers may
answer to the same model name differently), model, temperature, template (by content), the prompt and the
two responses *as shown* (first, second), so the order is part of the key and a pair judged with
the files swapped reuses the same entries. Only successful replies are stored (an unparseable or
refused reply is still a reply; an API error is not), so a rerun retries exactly the failures.
Every put is its own committed transaction: a killed run loses at most the replies in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2  # 2: the endpoint is part of the key


def cache_key(
    *,
    endpoint: str,
    model: str,
    temperature: float,
    template: str,
    prompt: str,
    first: str,
    second: str,
) -> str:
    blob = json.dumps(
        [SCHEMA_VERSION, endpoint, model, float(temperature), template, prompt, first, second],
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    text: str
    refusal: bool
    prompt_tokens: int
    completion_tokens: int


class JudgeCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed process (our resume case); only power loss can drop the
        # last commits, which a rerun simply requests again.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "text TEXT NOT NULL, refusal INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
            "completion_tokens INTEGER NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> CachedReply | None:
        row = self._db.execute(
            "SELECT text, refusal, prompt_tokens, completion_tokens FROM replies WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return CachedReply(row[0], bool(row[1]), int(row[2]), int(row[3]))

    def put(self, key: str, model: str, reply: CachedReply) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                model,
                reply.text,
                int(reply.refusal),
                reply.prompt_tokens,
                reply.completion_tokens,
                time.time(),
            ),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
