"""The resumable inference file: rows appended batch by batch, read back on a rerun.

A kill can only leave whole rows plus, at worst, one torn last line (a write cut short has no
final newline): that line is dropped and its rows are made again. Any other unreadable line is
the user's to fix, so it is an error naming the line. A sidecar `<out>.run.json` records the
settings the rows were made with; resuming with different ones would mix two runs in one file,
so it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from wprctl.console import err_console
from wprctl.errors import UserError
from wprctl.judge.io import write_json_atomic


def read_rows(path: Path, *, required: tuple[str, ...] = ("id",)) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by `append_rows` (none if it does not exist).

    A torn last line is cut off the file (with a note); a bad line elsewhere, or a row without
    one of `required`, is a UserError naming the line."""
    if not path.exists():
        return []
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected a JSONL output file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            data += b"\n"  # a complete row without its newline: keep it
            with path.open("ab") as fh:
                fh.write(b"\n")
        except ValueError:
            with path.open("r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
            err_console.print(
                f"[yellow]note:[/] {path}: dropped a torn last line (an interrupted write); "
                "its rows are made again"
            )
    rows: list[dict[str, Any]] = []
    for n, raw in enumerate(data.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise UserError(
                f"{path}, line {n}: not valid JSON ({exc}); fix or delete the line, or delete "
                "the file to start over"
            ) from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise UserError(
                f"{path}, line {n}: expected a JSON object with {', '.join(map(repr, required))}"
            )
        rows.append(row)
    return rows


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows in one write, so a kill tears at most the last line."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()


def settings_file(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def check_settings(out: Path, settings: dict[str, Any], has_rows: bool) -> None:
    """Refuse to add rows made with other settings to an existing output; record them if new."""
    sidecar = settings_file(out)
    if has_rows and sidecar.exists():
        try:
            old = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{sidecar}: unreadable ({exc}); delete it to resume anyway") from None
        diff = [k for k in settings if k in old and old[k] != settings[k]]
        if diff:
            shown = "; ".join(f"{k}: {old[k]!r} -> {settings[k]!r}" for k in diff)
            raise UserError(
                f"{out}: its rows were made with other settings ({shown}). Pass another --out, "
                f"or delete {out} and {sidecar} to start over."
            )
    write_json_atomic(sidecar, settings)
