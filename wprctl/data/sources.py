"""Where rows come from: a local file (jsonl, json, parquet, optionally .gz), a folder of such
files (or a `datasets.save_to_disk` folder), or a hub id through `datasets.load_dataset`.

Local JSON lines are read by this module rather than by `datasets`, so that a broken line is a
counted bad row with its line number instead of a failed load (and so that TL;DR files whose
`site`/`article` columns are all null need no explicit Features).

Splits: a folder's files are matched to a split by name (`train-00000.parquet`,
`data/validation.jsonl`, `test.json`...). A single file, or a folder without split names, holds
one split: its evaluation part is a fixed 10% of the prompts chosen by a hash of the prompt text
(so comparisons of one post never straddle train and eval, whatever the seed).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.data.base import Adapter, RawRow
from wprctl.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test", "eval", "dev")
HOLDOUT_BUCKETS = 10  # 1 in 10 prompts goes to eval when a source has a single split


@dataclass(frozen=True)
class InvalidJSON:
    message: str


@dataclass
class SourceRows:
    rows: Iterable[RawRow]
    description: str  # the file, folder or hub id, for messages and `.source`
    holdout: bool = False  # one-split source: the caller keeps the train or eval part


def _is_data_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(DATA_SUFFIXES)


def _open_text(path: Path):
    # surrogateescape turns invalid UTF-8 into lone surrogates, counted as bad rows later;
    # utf-8-sig drops the byte-order mark some editors write, which would spoil the first row
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return path.open("r", encoding="utf-8-sig", errors="surrogateescape")


def _read_jsonl(path: Path, start: int) -> Iterator[RawRow]:
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data: Any = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                data = InvalidJSON(str(exc))
            yield RawRow(data, str(path), f"line {n}", start + n - 1)


def _read_json(path: Path, start: int) -> Iterator[RawRow]:
    with _open_text(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file, as `datasets` also accepts
            yield from _read_jsonl(path, start)
            return
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        data = [data]
    for i, row in enumerate(data):
        yield RawRow(row, str(path), f"row {i + 1}", start + i)


def _read_parquet(path: Path, start: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield RawRow(row, str(path), f"row {i + 1}", start + i)


def read_files(files: list[Path]) -> Iterator[RawRow]:
    start = 0
    for f in files:
        name = f.name.lower()
        if name.endswith(".parquet"):
            reader = _read_parquet
        elif name.endswith((".json", ".json.gz")):
            reader = _read_json
        else:
            reader = _read_jsonl
        last = start - 1
        for row in reader(f, start):
            last = row.index
            yield row
        start = last + 1


def _split_tokens(rel: Path) -> list[str]:
    return [t for t in re.split(r"[-_./\\]+", str(rel).lower()) if t]


def _files_for(files: list[tuple[Path, list[str]]], names: Iterable[str]) -> list[Path]:
    for name in names:
        hit = [p for p, toks in files if any(t == name or t.startswith(name) for t in toks)]
        if hit:
            return hit
    return []


def _rows_from_disk(folder: Path, split: str, names: tuple[str, ...]) -> SourceRows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise UserError(f"{folder}: cannot load the saved dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        for name in names:
            if name in ds:
                return SourceRows(_rows_of(ds[name], f"{folder}[{name}]"), f"{folder}[{name}]")
        if split == "eval" or len(ds) != 1:
            raise UserError(
                f"{folder}: no split named {' or '.join(names)}; it has {', '.join(ds)}"
            )
        ds = next(iter(ds.values()))
    return SourceRows(_rows_of(ds, str(folder)), str(folder), holdout=True)


def _rows_of(ds: Any, desc: str) -> Iterator[RawRow]:
    for i, row in enumerate(ds):
        yield RawRow(row, desc, f"row {i + 1}", i)


def looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.lower().endswith(
        DATA_SUFFIXES
    )


def resolve_path(spec: str, root: Path) -> Path:
    p = Path(os.path.expanduser(spec))
    return p if p.is_absolute() else root / p


def source_rows(cfg: Any, adapter: Adapter, split: str, root: Path) -> SourceRows:
    """The rows of `split` ("train" or "eval") for the manifest's data section."""
    spec = cfg.path or adapter.hub_id
    if not spec:
        raise UserError(
            f"data.path: the {cfg.dataset!r} dataset needs a path (a .jsonl/.json/.parquet "
            "file or a folder of them)"
        )
    names = (cfg.train_split,) if split == "train" else (
        (cfg.eval_split,) if cfg.eval_split else EVAL_SPLIT_NAMES
    )  # fmt: skip
    local = resolve_path(spec, root)
    if local.exists():
        return _local_rows(local, split, names, cfg, root)
    if looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
        return _hub_rows(spec, adapter, cfg, split, names)
    raise UserError(f"data.path: {local} does not exist (and {spec!r} is not a hub id)")


def _local_rows(path: Path, split: str, names: tuple[str, ...], cfg: Any, root: Path) -> SourceRows:
    if path.is_file():
        if split == "eval" and cfg.eval_split:
            other = resolve_path(cfg.eval_split, root)
            if other.is_file():
                return SourceRows(read_files([other]), str(other))
        if not _is_data_file(path):
            raise UserError(f"data.path: {path} is not a .jsonl, .json or .parquet file")
        return SourceRows(read_files([path]), str(path), holdout=True)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _rows_from_disk(path, split, names)
    files = sorted(p for p in path.rglob("*") if _is_data_file(p))
    if not files:
        raise UserError(f"data.path: {path} holds no .jsonl, .json or .parquet files")
    tagged = [(p, _split_tokens(p.relative_to(path))) for p in files]
    chosen = _files_for(tagged, names)
    if chosen:
        return SourceRows(read_files(chosen), f"{path} ({', '.join(p.name for p in chosen)})")
    train_files = _files_for(tagged, (cfg.train_split,))
    eval_files = _files_for(tagged, (cfg.eval_split,) if cfg.eval_split else EVAL_SPLIT_NAMES)
    if split == "train" and eval_files:
        raise UserError(
            f"data.path: {path} has no file for the train split {cfg.train_split!r} "
            f"(found {', '.join(p.name for p in files)})"
        )
    # no file for this split: the folder is one split (or only train): hold out from it
    pool = train_files or files
    return SourceRows(read_files(pool), f"{path} ({', '.join(p.name for p in pool)})", holdout=True)


def _hub_rows(
    hub_id: str, adapter: Adapter, cfg: Any, split: str, names: tuple[str, ...]
) -> SourceRows:
    import datasets

    from wprctl.hub import offline_unless_reachable

    offline_unless_reachable()
    config = cfg.config_name or adapter.hub_config
    errors = []
    for name in names:
        try:
            ds = datasets.load_dataset(hub_id, config, split=name)
        except ValueError as exc:  # unknown split: try the next name
            errors.append(f"{name}: {exc}")
            continue
        except Exception as exc:
            raise UserError(
                f"data.path: cannot load {hub_id!r} (config {config!r}, split {name!r}) from "
                f"the Hugging Face hub: {exc}. Offline? Point data.path at a local copy "
                "(a .jsonl/.json/.parquet file or folder in the hub's schema)."
            ) from None
        desc = f"{hub_id}[{name}]"
        return SourceRows(_rows_of(ds, desc), desc)
    raise UserError(
        f"data.path: {hub_id!r} has no split {' or '.join(names)} ({'; '.join(errors)[:500]})"
    )


def stat_signature(spec: str | None, root: Path) -> tuple[Any, ...]:
    """Changes when a local source changes; used to memoize loads within one process."""
    if not spec:
        return ()
    p = resolve_path(spec, root)
    if p.is_file():
        st = p.stat()
        return (str(p), st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return tuple(
            (str(f), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(p.rglob("*"))
            if f.is_file()
        )
    return (spec,)
