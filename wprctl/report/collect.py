"""The runs a report reads: every stage named in the manifest, the lineage or a run folder.

Everything is read leniently: a stage may be writing its files while the report runs, so a torn
line or a half-written summary is skipped rather than fatal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wprctl.errors import UserError
from wprctl.manifest import Manifest
from wprctl.runs import note_input, project_runs, read_metrics

POLICY_KINDS = ("ppo", "dar")


@dataclass
class Run:
    """One stage run as found on disk."""

    name: str
    kind: str
    status: str  # finished | running | interrupted | failed | empty | not started
    root: Path
    state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)  # state.json (or lineage)
    stale_inputs: list[str] = field(default_factory=list)  # redone after this run read them

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def has_data(self) -> bool:
        return bool(self.rows or self.summary)

    @property
    def label(self) -> str:
        return self.name if self.finished else f"{self.name} ({self.status})"

    @property
    def seconds(self) -> float | None:
        start, end = self.state.get("started"), self.state.get("finished")
        return (
            end - start if isinstance(start, int | float) and isinstance(end, int | float) else None
        )

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Steps and finite values of one metric, in logged order."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                steps.append(float(row.get("step", len(steps))))
                values.append(float(value))
        return steps, values

    def first(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[0] if values else None

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        if values:
            return values[-1]
        value = self.final_metrics.get(key)
        return float(value) if isinstance(value, int | float) else None

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.rows if isinstance(r.get("step"), int | float)]
        return int(max(steps)) if steps else None


def read_json_lenient(path: Path) -> Any:
    """A JSON file, or None when it is missing or cut short (a stage may be writing it now)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _summary_file(outputs: dict[str, Any]) -> Path | None:
    if outputs.get("summary"):
        return Path(outputs["summary"])
    if outputs.get("jsonl"):
        out = Path(outputs["jsonl"])
        return out.with_name(out.name + ".summary.json")
    return None


def check_output_dir(manifest: Manifest) -> Path:
    out = manifest.output_dir
    if not out.is_dir():
        where = f" (project.output_dir in {manifest.source})" if manifest.source else ""
        raise UserError(
            f"{out}: the project's output folder{where} does not exist, so there is nothing to "
            "report. Run a stage first (`wprctl run`) or point project.output_dir at the runs."
        )
    return out


def collect_runs(manifest: Manifest) -> list[Run]:
    """Every run named in the manifest's stages, the lineage or a run folder, report excluded."""
    check_output_dir(manifest)
    runs = []
    for r in project_runs(manifest, read_state=read_json_lenient):
        if r.kind == "report":
            continue
        summary_path = _summary_file(r.record.get("outputs", {}))
        if summary_path is None and r.dir.root.exists():
            # an evaluation stage still running has no outputs recorded yet; its summary (if any)
            # sits next to the stage's JSONL in its own folder
            summary_path = next(iter(sorted(r.dir.root.glob("*.jsonl.summary.json"))), None)
        summary = read_json_lenient(summary_path) if summary_path else None
        note_input(r.name, r.entry)  # a report run by `wprctl run` goes stale when r is redone
        runs.append(
            Run(
                name=r.name,
                kind=r.kind,
                status=r.status,
                root=r.dir.root,
                state=r.state,
                config=read_json_lenient(r.dir.config_file) or {},
                rows=[row for row in read_metrics(r.dir.metrics_file) if isinstance(row, dict)],
                summary=summary if isinstance(summary, dict) else None,
                final_metrics=r.record.get("metrics", {}),
                stale_inputs=r.stale_inputs,
            )
        )
    return runs


def of_kind(runs: Sequence[Run], *kinds: str) -> list[Run]:
    return [r for r in runs if r.kind in kinds and r.has_data]
