"""Reading JSONL that users hand us (every bad line is a UserError that names the file and line),
and writing files atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from wprctl.errors import UserError


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; any bad line is a UserError naming it."""
    p = Path(path)
    if not p.is_file():
        what = "a folder" if p.is_dir() else "file not found"
        raise UserError(f"{p}: {what} (expected a JSONL file, one JSON object per line)")
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        with p.open(encoding="utf-8-sig") as fh:  # a BOM would spoil line 1
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))  # columns of the line itself
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{p}, line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{p}, line {n}: expected a JSON object, got {type(obj).__name__}"
                    )
                rows.append((n, obj))
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text ({exc.reason})") from None
    return rows


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` by a uniquely named temporary file and a rename: readers (and
    several ranks writing the same file) never see a partial file; a failed write leaves no
    temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_file(out: Path, inputs: Iterable[str | Path] = (), option: str = "--out") -> None:
    """Before any work: ``out`` can be written as a file, and is none of the ``inputs``.

    Writing an input in place (``--out`` = the file being read, easily done with tab completion)
    would replace a stage's output, or generations, with this command's result: refused."""
    if out.is_dir():
        raise UserError(f"{option} {out}: is a folder; give a file name, e.g. {out / 'out.jsonl'}")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{option} {out}: {parent} is a file, not a folder")
    for source in inputs:
        if out.exists() and Path(source).exists() and os.path.samefile(out, source):
            raise UserError(
                f"{option} {out}: that is the input file {source}, which writing would destroy; "
                "give another file name"
            )
