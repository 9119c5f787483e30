"""Project-level operations: writing a manifest from a template, and the status of every stage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import wprctl
from wprctl.errors import UserError
from wprctl.manifest import Manifest, load_manifest
from wprctl.runs import project_runs

TEMPLATES = ("demo", "tldr", "hh-rlhf", "apps")


def pipelines_dir() -> Path:
    """The ready manifests. ``wprctl/assets/pipelines`` links to the source tree's ``pipelines/``,
    and a built wheel holds a copy, so a plain ``pip install`` finds them too."""
    path = Path(wprctl.__file__).resolve().parent / "assets" / "pipelines"
    if not path.is_dir():
        raise UserError(f"{path}: the ready manifests are missing from this wprctl installation")
    return path


def init_project(directory: Path, template: str, force: bool) -> Path:
    if template not in TEMPLATES:
        raise UserError(f"--template {template!r}: allowed: {', '.join(TEMPLATES)}")
    source = pipelines_dir() / f"{template}.toml"
    target = directory / "wprctl.toml"
    if target.exists() and not force:
        raise UserError(f"{target} already exists; use --force to overwrite it")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: not a folder; `wprctl init DIR` writes DIR/wprctl.toml")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{directory}: cannot create the project folder ({exc})") from None
    text = source.read_text(encoding="utf-8")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", directory.resolve().name) or "wprctl-project"
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', text, count=1)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{target}: cannot write the manifest ({exc})") from None
    load_manifest(target)  # a template that does not validate is our bug; fail loudly here
    return target


def _missing(outputs: dict[str, Any]) -> list[str]:
    return sorted(
        k for k, path in outputs.items() if isinstance(path, str) and not Path(path).exists()
    )


def stage_status(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per stage or variant named in `stages`, in the lineage or with a run folder."""
    rows = []
    for r in project_runs(manifest):
        started, finished = r.state.get("started"), r.state.get("finished")
        rows.append(
            {
                "name": r.name,
                "stage": r.kind,
                "status": r.status,
                "outputs": r.record.get("outputs", {}),
                "metrics": r.record.get("metrics", {}),
                "seconds": (finished - started) if started and finished else None,
                "checkpoint": r.dir.has_checkpoint(),
                "path": str(r.dir.root),
                "error": r.state.get("error"),
                # finished from inputs that were redone since: its numbers are out of date
                "stale_inputs": r.stale_inputs,
                # the run a --force run replaces, kept until that one finishes or checkpoints
                "set_aside": str(r.dir.replaced_dir) if r.dir.replaced_dir.exists() else None,
                # a finished run's outputs deleted or moved since: what reads them will fail
                "missing_outputs": _missing(r.record.get("outputs", {}))
                if r.status == "finished"
                else [],
            }
        )
    return rows
