"""Options shared by every command that reads the manifest, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ManifestOpt = Annotated[
    Path,
    typer.Option(
        "-m",
        "--manifest",
        help="Project manifest (TOML).",
        show_default=True,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one manifest key, e.g. --set ppo.regularizer.kind=kl (repeatable).",
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint of this stage.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Start over even if the stage has finished or started.")
]
NumProcOpt = Annotated[
    int | None,
    typer.Option(
        "--num-processes",
        min=1,
        help="Run under DeepSpeed's launcher with N processes (default: deepspeed.num_processes).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

DEFAULT_MANIFEST = Path("wprctl.toml")
