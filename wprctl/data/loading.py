"""`load_examples`: rows of one split through the manifest's adapter, with bad rows counted per
reason, reported as a table, and a UserError when too many are bad or none are left."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from wprctl.data.base import Example, ExampleSet, RawRow, SkipRow, get_adapter
from wprctl.data.demo import demo_rows, kept_demo_rows
from wprctl.data.sources import (
    HOLDOUT_BUCKETS,
    InvalidJSON,
    SourceRows,
    source_rows,
    stat_signature,
)
from wprctl.errors import UserError

# Import the adapters so that they register themselves.
from wprctl.data import apps, hh_rlhf, jsonl, tldr  # noqa: F401  # isort: skip

SPLITS = ("train", "eval")
_MEMO: dict[tuple[Any, ...], ExampleSet] = {}
_REPORTED: set[tuple[str, tuple[tuple[str, int], ...]]] = set()


def load_examples(
    cfg: Any,
    split: str = "train",
    seed: int = 42,
    *,
    root: Path | None = None,
    write_dir: Path | None = None,
    report: bool = True,
) -> ExampleSet:
    """The Examples of `split` ("train" or "eval") of the manifest's `[data]` section.

    `root` resolves a relative `data.path` (the manifest's folder). For the demo task,
    `write_dir` keeps the generated rows there as jsonl, for inspection and for the next
    run to read instead of generating them again (``demo.kept_demo_rows``).
    """
    if split not in SPLITS:
        raise UserError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    root = root or Path.cwd()
    key = (cfg.model_dump_json(), split, seed, str(root), stat_signature(cfg.path, root))
    cached = _MEMO.get(key)
    if cached is None:
        cached = _load(cfg, split, seed, root, write_dir)
        _MEMO[key] = cached
        if report and cached.n_skipped:
            print_skipped(cached)
    return cached


def _demo_source(cfg: Any, split: str, seed: int, write_dir: Path | None) -> SourceRows:
    n = cfg.demo.n_train if split == "train" else cfg.demo.n_validation
    desc = f"demo task (seed {seed}, {split})"
    raw = (
        demo_rows(seed, split, n)
        if write_dir is None
        else kept_demo_rows(write_dir, seed, split, n)
    )
    return SourceRows([RawRow(r, desc, f"row {i + 1}", i) for i, r in enumerate(raw)], desc)


def _load(cfg: Any, split: str, seed: int, root: Path, write_dir: Path | None) -> ExampleSet:
    adapter = get_adapter(cfg.dataset)
    if cfg.dataset == "demo":
        src = _demo_source(cfg, split, seed, write_dir)
    else:
        src = source_rows(cfg, adapter, split, root)
    out = parse_rows(src.rows, adapter, cfg, src.description)
    check_bad_fraction(out, cfg.max_bad_fraction)
    if src.holdout:
        out.examples = holdout_part(out.examples, split)
        if not out.examples:
            raise UserError(
                f"{src.description}: no rows left for the {split} split after holding out "
                f"1 in {HOLDOUT_BUCKETS} prompts for evaluation; give a larger file or a "
                "folder with train and validation files"
            )
    if split == "eval" and cfg.max_eval_rows is not None:
        out.examples = out.examples[: cfg.max_eval_rows]
    return out


def parse_rows(rows: Iterable[RawRow], adapter: Any, cfg: Any, source: str) -> ExampleSet:
    out = ExampleSet(examples=[], source=source)
    seen: Counter[str] = Counter()
    for raw in rows:
        out.n_rows += 1
        try:
            if isinstance(raw.data, InvalidJSON):
                raise SkipRow("invalid JSON", raw.data.message)
            ex = adapter.parse(raw, cfg)
        except SkipRow as skip:
            out.skipped[skip.reason] += 1
            if out.first_bad is None:
                detail = f" ({skip.detail})" if skip.detail else ""
                out.first_bad = f"{raw.file} {raw.where}: {skip.reason}{detail}"
            continue
        # ids are unique within a split: TL;DR has several comparisons per post
        seen[ex.id] += 1
        if seen[ex.id] > 1:
            ex.meta.setdefault("group", ex.id)
            ex.id = f"{ex.id}-{seen[ex.id]}"
        out.examples.append(ex)
    return out


def check_bad_fraction(out: ExampleSet, max_bad_fraction: float) -> None:
    if out.n_rows == 0:
        raise UserError(f"{out.source}: no rows")
    reasons = ", ".join(f"{r}: {n}" for r, n in out.skipped.most_common())
    if not out.examples:
        raise UserError(
            f"{out.source}: no usable rows (all {out.n_rows} are bad: {reasons}); "
            f"first bad row: {out.first_bad}"
        )
    frac = out.n_skipped / out.n_rows
    if frac > max_bad_fraction:
        raise UserError(
            f"{out.source}: {out.n_skipped} of {out.n_rows} rows are bad ({frac:.0%} > "
            f"data.max_bad_fraction = {max_bad_fraction:g}; {reasons}); "
            f"first bad row: {out.first_bad}"
        )


def prompt_bucket(prompt: str) -> int:
    return (
        int.from_bytes(hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()[:8], "big")
        % HOLDOUT_BUCKETS
    )


def holdout_part(examples: list[Example], split: str) -> list[Example]:
    """The train or eval part of a one-split source: 1 in HOLDOUT_BUCKETS prompts is eval.

    A tiny source still gets one eval prompt and keeps one train prompt, when it has two."""
    in_eval = {ex.prompt: prompt_bucket(ex.prompt) == 0 for ex in examples}
    prompts = list(in_eval)  # first-seen order
    if len(prompts) < 2:
        in_eval = dict.fromkeys(prompts, False)
    elif not any(in_eval.values()):
        in_eval[prompts[0]] = True
    elif all(in_eval.values()):
        in_eval[prompts[0]] = False
    want_eval = split == "eval"
    return [ex for ex in examples if in_eval[ex.prompt] == want_eval]


def skipped_table(out: ExampleSet):
    from rich.table import Table

    table = Table(title="skipped rows", title_justify="left")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, n in out.skipped.most_common():
        table.add_row(reason, str(n))
    table.add_row("[dim]kept / read[/]", f"[dim]{out.n_rows - out.n_skipped} / {out.n_rows}[/]")
    return table


def print_skipped(out: ExampleSet) -> None:
    from wprctl.console import err_console, is_main_process

    # a one-split file is read for train and for eval: report its bad rows once
    key = (out.source, tuple(sorted(out.skipped.items())))
    if is_main_process() and key not in _REPORTED:
        _REPORTED.add(key)
        err_console.print(f"{out.source}: {out.n_skipped} bad row(s) skipped", soft_wrap=True)
        err_console.print(skipped_table(out))
        if out.first_bad:
            err_console.print(f"[dim]first bad row: {out.first_bad}[/]", soft_wrap=True)


def clear_cache() -> None:
    _MEMO.clear()
    _REPORTED.clear()
