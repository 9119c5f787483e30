"""The paper's evaluation subset: n prompts, seeded, optionally stratified.

The unit is an id (a prompt): a file with several samples per id keeps all rows of each chosen
id. Ids are shuffled with `random.Random(seed)`; walking that order, an id is taken while its
stratum holds fewer than `per_stratum`; if the strata run dry before n, the rest of the shuffled
order tops the subset up to n regardless of stratum. Rows keep their file order in the output.
Rows whose field is missing, null or empty form the `ARTICLE` stratum (CNN/DM articles have no
subreddit).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.errors import UserError
from wprctl.judge.io import id_key, read_jsonl

EMPTY_STRATUM = "ARTICLE"


def field_value(row: dict[str, Any], field: str) -> tuple[bool, Any]:
    """(found, value) for a field at the top level, under `meta`, or as a dotted path."""
    for holder in (row, row.get("meta") if isinstance(row.get("meta"), dict) else None):
        if holder is not None and field in holder:
            return True, holder[field]
    node: Any = row
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def stratum_of(row: dict[str, Any], field: str) -> str:
    _, value = field_value(row, field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return EMPTY_STRATUM
    return str(value)


@dataclass
class Subset:
    rows: list[dict[str, Any]]
    ids: list[str]
    strata: Counter[str]
    available: int
    topped_up: int


def choose_ids(
    ids: list[str], strata: dict[str, str] | None, n: int, seed: int, per_stratum: int
) -> tuple[list[str], int]:
    """The chosen ids (in shuffled order) and how many came from the top-up."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    if strata is None:
        return order[:n], 0
    taken: list[str] = []
    per: Counter[str] = Counter()
    rest: list[str] = []
    for i in order:
        if len(taken) < n and per[strata[i]] < per_stratum:
            taken.append(i)
            per[strata[i]] += 1
        else:
            rest.append(i)
    top_up = rest[: max(0, n - len(taken))]
    return taken + top_up, len(top_up)


def sample_file(
    path: str | Path, n: int, seed: int, stratify: str | None = None, per_stratum: int = 5
) -> Subset:
    p = Path(path)
    rows = read_jsonl(p)
    if not rows:
        raise UserError(f"{p}: no rows to sample from")
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line, row in rows:
        if "id" not in row:
            raise UserError(f"{p}, line {line}: missing key 'id' (rows are sampled by id)")
        by_id.setdefault(id_key(row["id"]), []).append(row)
    strata: dict[str, str] | None = None
    if stratify:
        if not any(field_value(r, stratify)[0] for _, r in rows):
            keys = sorted(
                {k for _, r in rows for k in r}
                | {
                    f"meta.{k}"
                    for _, r in rows
                    if isinstance(r.get("meta"), dict)
                    for k in r["meta"]
                }
            )
            raise UserError(
                f"{p}: no row has a field {stratify!r} (looked at the top level and under "
                f"'meta'); fields present: {', '.join(keys)}"
            )
        strata = {i: stratum_of(group[0], stratify) for i, group in by_id.items()}
    chosen, topped = choose_ids(list(by_id), strata, n, seed, per_stratum)
    chosen_set = set(chosen)
    out_rows = [r for _, r in rows if id_key(r["id"]) in chosen_set]
    counts: Counter[str] = Counter(strata[i] for i in chosen) if strata else Counter()
    return Subset(out_rows, chosen, counts, len(by_id), topped)
