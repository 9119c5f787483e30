"""`wprctl report`: tables in the terminal, PNG figures and an index.md of every stage so far."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, ManifestOpt, SetOpt


def report(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for index.md and the PNGs (default: <output_dir>/report)."
        ),
    ] = None,
) -> None:
    """Tables and PNG plots of every finished (or partly run) stage, tied together by index.md:
    loss curves, reward / penalty / KL curves of all PPO variants, the reward-vs-KL frontier, judge
    win rates with intervals and APPS pass@k per difficulty."""
    from wprctl.console import console
    from wprctl.manifest import load_manifest
    from wprctl.report import build_report, print_report

    m = load_manifest(manifest, set_)
    result = build_report(m, out)
    if result.empty:
        console.print(
            f"[yellow]Nothing to report yet:[/] no stage under {result.output_dir} has finished or "
            f"logged metrics. Run `wprctl run -m {manifest}` first."
        )
        console.print(f"wrote {result.index}")
        return
    print_report(result, console.print)
    for run in result.missing:
        console.print(f"[dim]not finished: {run.name} ({run.status})[/]")
    console.print(
        f"wrote {len(result.figures)} figures and {result.index}"
        + "".join(f"\n  {result.out_dir / f.file}" for f in result.figures)
    )


def register(app: typer.Typer) -> None:
    app.command("report")(report)
