"""JSONL in and out for judging and sampling: line-precise errors, atomic rewrites, and pairing.

Inference files hold rows `{"id", "prompt", "response", "reward", ...}`; several samples for one
prompt are several rows with the same id (and a `sample` index). Judging compares one response
per id: the row with the lowest `sample` index, or the first row when there is none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.errors import UserError
from wprctl.jsonl import jsonl_text, read_jsonl, write_text_atomic


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(Path(path), jsonl_text(rows))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def id_key(value: Any) -> str:
    """Ids compare as text, so 7 in one file pairs with "7" in the other."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Pair:
    id: Any
    prompt: str
    response_a: str
    response_b: str

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass
class Responses:
    path: Path
    rows: dict[str, dict[str, Any]]  # id key -> the row judged for that id, in file order
    multi_sample_ids: int = 0


def load_responses(path: str | Path) -> Responses:
    p = Path(path)
    chosen: dict[str, tuple[int, dict[str, Any]]] = {}
    seen: dict[str, int] = {}
    first: dict[str, tuple[int, str]] = {}  # id -> (line, prompt) where it first appears
    for n, row in read_jsonl(p):
        for field in ("id", "prompt", "response"):
            if field not in row:
                raise UserError(
                    f"{p}, line {n}: missing key {field!r} (inference rows need "
                    '"id", "prompt" and "response")'
                )
        for field in ("prompt", "response"):
            if not isinstance(row[field], str):
                raise UserError(f"{p}, line {n}: {field!r} must be a string")
        key = id_key(row["id"])
        line, prompt = first.setdefault(key, (n, row["prompt"]))
        if prompt.strip() != row["prompt"].strip():
            # several samples of one prompt share its id; two prompts must not
            raise UserError(
                f"{p}, line {n}: id {row['id']!r} is also on line {line}, with another prompt; "
                "ids must name one prompt"
            )
        seen[key] = seen.get(key, 0) + 1
        rank = row.get("sample", 0) if isinstance(row.get("sample", 0), int) else 0
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, row)
    if not chosen:
        raise UserError(f"{p}: no rows (expected inference JSONL rows with id, prompt, response)")
    return Responses(
        path=p,
        rows={k: v[1] for k, v in chosen.items()},
        multi_sample_ids=sum(1 for c in seen.values() if c > 1),
    )


def pair_responses(a: Responses, b: Responses) -> tuple[list[Pair], list[str]]:
    """Pairs by id in A's order, and notes for the user (dropped ids, multi-sample files)."""
    notes: list[str] = []
    for r in (a, b):
        if r.multi_sample_ids:
            notes.append(
                f"{r.path}: {r.multi_sample_ids} ids have several samples; judging sample 0 "
                "(the lowest `sample` index, else the first row) of each"
            )
    pairs: list[Pair] = []
    for key, row_a in a.rows.items():
        row_b = b.rows.get(key)
        if row_b is None:
            continue
        if row_a["prompt"].strip() != row_b["prompt"].strip():
            raise UserError(
                f"id {row_a['id']!r}: the prompts differ between {a.path} and {b.path}; "
                "pairs must share the prompt (were both files generated from the same split?)"
            )
        pairs.append(Pair(row_a["id"], row_a["prompt"], row_a["response"], row_b["response"]))
    only_a = len(a.rows) - len(pairs)
    only_b = len(b.rows) - len(pairs)
    if not pairs:
        raise UserError(f"{a.path} and {b.path} share no id: nothing to judge")
    if only_a or only_b:
        notes.append(
            f"{only_a} ids only in {a.path} and {only_b} only in {b.path} were left out; "
            f"judging the {len(pairs)} ids in both"
        )
    return pairs, notes
