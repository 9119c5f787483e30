"""`wprctl init`, `status`, `run` and `quickstart`: the project as a whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wprctl.commands.options import (
    DEFAULT_MANIFEST,
    JsonOpt,
    ManifestOpt,
    NumProcOpt,
    SetOpt,
)


def init(
    directory: Annotated[Path, typer.Argument(help="Project folder (created if missing).")] = Path(
        "."
    ),
    template: Annotated[
        str, typer.Option("--template", "-t", help="demo | tldr | hh-rlhf | apps")
    ] = "demo",
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing wprctl.toml.")
    ] = False,
) -> None:
    """Write DIR/wprctl.toml from a template: demo (tiny model, CPU, minutes), tldr, hh-rlhf or apps
    (the paper's settings; point data.path at a hub id or a local copy)."""
    from wprctl.console import console
    from wprctl.project import init_project

    target = init_project(directory, template, force)
    console.print(f"wrote {target} (template {template}). Next: `wprctl status -m {target}`")


def status(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show which stages are done, where their outputs are and their key metrics."""
    from rich.table import Table

    from wprctl.console import print_table, short_metrics
    from wprctl.manifest import load_manifest
    from wprctl.project import stage_status

    m = load_manifest(manifest, set_)
    rows = stage_status(m)
    if as_json:
        typer.echo(
            json.dumps(
                {"project": m.project.name, "output_dir": str(m.output_dir), "stages": rows},
                indent=2,
            )
        )
        return
    table = Table(title=f"{m.project.name}  ({m.output_dir})")
    for col in ("stage", "kind", "status", "time", "key metrics", "output"):
        table.add_column(col, overflow="fold")
    colors = {
        "finished": "green",
        "running": "yellow",
        "stopped": "yellow",
        "interrupted": "red",
        "failed": "red",
    }
    for r in rows:
        metrics = short_metrics(r["metrics"])
        out = r["outputs"].get("model") or next(iter(r["outputs"].values()), "") or r["path"]
        st = r["status"] + (
            " (checkpoint)" if r["checkpoint"] and r["status"] != "finished" else ""
        )
        if r["missing_outputs"]:
            st += f" [red](missing: {', '.join(r['missing_outputs'])})[/]"
        if r["stale_inputs"]:
            st += f" [yellow](stale: {', '.join(r['stale_inputs'])} redone since)[/]"
        if r["set_aside"]:
            st += f" [dim](the run it replaces is kept in {r['set_aside']})[/]"
        table.add_row(
            r["name"],
            r["stage"],
            f"[{colors.get(r['status'], 'dim')}]{st}[/]",
            f"{r['seconds']:.0f}s" if r["seconds"] else "",
            metrics,
            out,
        )
    print_table(table)


def run(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    set_: SetOpt = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Start at this stage (a name in `stages`).")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Stop after this stage (a name in `stages`).")
    ] = None,
    num_processes: NumProcOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start the selected stages over, finished ones too (pick them with --from/--to).",
        ),
    ] = False,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Also redo the finished stages whose inputs were redone since (the ones said to "
            "be stale), and in turn the ones that read them.",
        ),
    ] = False,
) -> None:
    """Run the manifest's `stages` in order: finished ones are skipped, partial ones resumed, and the
    first failure stops the run. Named \\[\\[variants]] (e.g. PPO with kl and with wpr) get their own
    output folders. Ends with a summary table."""
    from wprctl.pipeline import run_pipeline

    run_pipeline(
        manifest, set_, start=from_, stop=to, num_processes=num_processes, force=force,
        redo_stale=stale,
    )  # fmt: skip


def quickstart(
    directory: Annotated[Path, typer.Argument(help="Project folder for the demo.")] = Path(
        "wprctl-demo"
    ),
    small: Annotated[
        bool, typer.Option("--small", help="A smaller, faster demo (for CI).")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """The embedded demo, offline on a CPU: a tiny model on the demo task, SFT -> RM -> PPO with kl,
    wpr (paper) and wpr (well-posed) -> inference -> judged by the gold oracle through a local
    OpenAI-compatible server -> APPS execution -> report."""
    from wprctl.quickstart import run_quickstart

    run_quickstart(directory, small=small, overrides=set_ or [])


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("status")(status)
    app.command("run")(run)
    app.command("quickstart")(quickstart)
