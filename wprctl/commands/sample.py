"""`wprctl sample FILE.jsonl --n 50`: the paper's evaluation subset of an inference file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        file: Annotated[
            Path,
            typer.Argument(metavar="FILE.jsonl", help="Inference output (JSONL rows with an id)."),
        ],
        out: Annotated[Path, typer.Option("--out", help="Where to write the subset (JSONL).")],
        n: Annotated[
            int, typer.Option("--n", "-n", min=1, help="Number of prompts (ids) to keep.")
        ] = 50,
        seed: Annotated[int, typer.Option("--seed", help="Random seed (the paper's: 42).")] = 42,
        stratify: Annotated[
            str | None,
            typer.Option(
                "--stratify",
                help="Field to stratify by, top level or under meta, e.g. subreddit (empty values form the ARTICLE stratum).",
            ),
        ] = None,
        per_stratum: Annotated[
            int,
            typer.Option(
                "--per-stratum",
                min=1,
                help="At most this many per stratum before the random top-up.",
            ),
        ] = 5,
    ) -> None:
        """Draw the paper's evaluation subset: n ids, seeded; stratified: at most 5 per stratum, topped up at random."""
        from wprctl.console import console, err_console
        from wprctl.jsonl import check_output_file
        from wprctl.judge.io import write_jsonl_atomic
        from wprctl.judge.subset import sample_file

        check_output_file(out, [file])
        subset = sample_file(file, n=n, seed=seed, stratify=stratify, per_stratum=per_stratum)
        if subset.available < n:
            err_console.print(
                f"[yellow]note:[/] {file} has only {subset.available} ids; keeping all of them"
            )
        write_jsonl_atomic(out, subset.rows)
        extra = f" ({len(subset.rows)} rows)" if len(subset.rows) != len(subset.ids) else ""
        console.print(f"wrote {len(subset.ids)} of {subset.available} ids{extra} to {out}")
        if stratify:
            top = ", ".join(f"{k}: {v}" for k, v in subset.strata.most_common(8))
            more = "" if len(subset.strata) <= 8 else f", ... ({len(subset.strata)} strata)"
            console.print(
                f"strata by {stratify}: {top}{more}; {subset.topped_up} from the random top-up"
            )
