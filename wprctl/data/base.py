"""What every adapter shares: the Example record, the Adapter interface and registry, and the
accounting of skipped rows (counted per reason, with the first bad row kept for the error)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from wprctl.errors import UserError


@dataclass
class Example:
    """One row as every stage sees it: the formatted prompt, responses, and metadata."""

    id: str
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RawRow:
    """A row from a source, with where it came from (for error messages)."""

    data: Any
    file: str
    where: str  # "line 12" or "row 12"
    index: int  # 0-based position in the source, for default ids


class SkipRow(Exception):
    """Raised by an adapter for a row it cannot use; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ExampleSet:
    examples: list[Example]
    source: str
    n_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_bad: str | None = None  # "FILE line N: reason (detail)"

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class Adapter(Protocol):
    """One data source: how its rows become Examples, and where it lives on the hub."""

    name: str
    hub_id: str | None
    hub_config: str | None

    def parse(self, row: RawRow, cfg: Any) -> Example:
        """The Example for one row, or SkipRow with the reason it is unusable."""
        ...


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UserError(
            f"data.dataset: unknown dataset {name!r}; allowed: {', '.join(sorted(ADAPTERS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# field helpers shared by the adapters

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_text(value: str, name: str) -> str:
    if _SURROGATE.search(value):
        raise SkipRow("surrogate characters", f"in {name!r}")
    return value


def get_field(row: dict[str, Any], name: str, *, required: bool = True) -> Any:
    """row[name] where `name` may be dotted (info.post); missing -> SkipRow or None."""
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            if required:
                raise SkipRow(f"missing field {name!r}")
            return None
        node = node[part]
    return node


def text_field(row: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    """A non-empty string field; empty or whitespace-only counts as bad, not as absent."""
    value = get_field(row, name, required=required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SkipRow(f"field {name!r} is not text", f"got {type(value).__name__}")
    if not value.strip():
        raise SkipRow(f"empty field {name!r}")
    return check_text(value, name)


def json_field(row: dict[str, Any], name: str, reason: str) -> Any:
    """A field holding JSON text (as on the hub) or already-decoded data; '' means absent."""
    value = get_field(row, name, required=False)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        check_text(value, name)
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SkipRow(reason, str(exc)) from None
    return value


def as_row(raw: RawRow) -> dict[str, Any]:
    if not isinstance(raw.data, dict):
        raise SkipRow("not a JSON object", f"got {type(raw.data).__name__}")
    return raw.data
