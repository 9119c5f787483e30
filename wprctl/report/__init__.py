"""`wprctl report`: tables and PNG figures of every stage that has something to show.

The report only reads what the stages wrote under the manifest's `output_dir`: `lineage.json`,
each run's `state.json`, `config.json` and `metrics.jsonl`, and the `<out>.summary.json` files of
inference, judge and APPS runs. It works on partial projects: a running or failed run with logged
metrics is drawn (labelled as such), and stages with nothing on disk are listed as missing.

`collect` reads the runs, `tables` and `figures` turn them into tables and PNGs, and this module
assembles them into `index.md`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.errors import UserError
from wprctl.manifest import Manifest
from wprctl.report.collect import POLICY_KINDS, Run, collect_runs, of_kind
from wprctl.report.figures import (
    FIGURE_FILES,
    POLICY_CURVES,
    FigureFile,
    apps_figure,
    color_map,
    frontier_figure,
    judge_figure,
    loss_figure,
    policy_figure,
    rm_figure,
)
from wprctl.report.tables import (
    Table,
    apps_table,
    infer_table,
    judge_table,
    policy_table,
    rm_table,
    sft_table,
    stages_table,
)
from wprctl.runs import owner_alive


@dataclass
class Section:
    heading: str
    tables: list[Table]
    figures: list[FigureFile]


@dataclass
class Report:
    project: str
    manifest: Path | None
    output_dir: Path
    out_dir: Path
    runs: list[Run]
    sections: list[Section]
    missing: list[Run]

    @property
    def figures(self) -> list[FigureFile]:
        return [f for s in self.sections for f in s.figures]

    @property
    def empty(self) -> bool:
        return not self.sections

    @property
    def index(self) -> Path:
        return self.out_dir / "index.md"


def _names_by_file(runs: Sequence[Run]) -> dict[str, str]:
    """Inference outputs -> the policy they sampled (else their run's name), so judge tables and
    figures read "ppo-wpr vs ppo-kl" rather than file paths."""
    names = {}
    for r in runs:
        if r.kind != "infer":
            continue
        summary = r.summary or {}
        jsonl = r.state.get("outputs", {}).get("jsonl") or summary.get("out")
        if jsonl:
            names[str(Path(jsonl).resolve())] = str(summary.get("model") or r.name)
    return names


def build_report(manifest: Manifest, out_dir: Path | None = None) -> Report:
    """Read every run, draw the figures into out_dir and return what the index shows."""
    runs = collect_runs(manifest)
    out_dir = out_dir or manifest.output_dir / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only place
        raise UserError(
            f"{out_dir}: cannot make the report folder there ({exc.strerror})"
        ) from None
    names_by_file = _names_by_file(runs)
    sections: list[Section] = []

    def add(heading: str, tables: list[Table], figures: list[FigureFile | None]) -> None:
        sections.append(Section(heading, tables, [f for f in figures if f is not None]))

    if sft := of_kind(runs, "sft"):
        add("Supervised fine-tuning", [sft_table(sft)], [loss_figure(sft, out_dir)])
    if rm := of_kind(runs, "rm"):
        add("Reward model", [rm_table(rm)], [rm_figure(rm, out_dir)])
    if policy := [r for r in of_kind(runs, *POLICY_KINDS) if r.rows]:
        colors = color_map(policy)
        figures = [policy_figure(c, policy, colors, out_dir) for c in POLICY_CURVES]
        figures.append(frontier_figure(policy, colors, out_dir))
        add("Policy optimisation (PPO variants and DAR)", [policy_table(policy)], figures)
    if infer := [r for r in of_kind(runs, "infer") if r.summary]:
        add("Inference", [infer_table(infer)], [])
    if judge := [r for r in of_kind(runs, "judge") if r.summary]:
        add(
            "Judge",
            [judge_table(judge, names_by_file)],
            [judge_figure(judge, names_by_file, out_dir)],
        )
    if apps := [r for r in of_kind(runs, "apps-eval") if r.summary]:
        add("APPS", [apps_table(apps)], [apps_figure(apps, out_dir)])

    produced = {f.file for s in sections for f in s.figures}
    for name in FIGURE_FILES:
        if name not in produced:
            (out_dir / name).unlink(missing_ok=True)
    missing = [r for r in runs if r.name in manifest.stages and not r.finished]
    report = Report(
        project=manifest.project.name,
        manifest=manifest.source,
        output_dir=manifest.output_dir,
        out_dir=out_dir,
        runs=runs,
        sections=sections,
        missing=missing,
    )
    report.index.write_text(render_index(report), encoding="utf-8")
    return report


def _missing_lines(report: Report) -> list[str]:
    if not report.missing:
        return ["Every stage listed in the manifest has finished."]
    lines = [
        "Stages of the manifest that have not finished (their sections are partial or absent):",
        "",
    ]
    for r in report.missing:
        what = {
            # a run written on another host, or by an older wprctl, cannot be told apart
            "running": "running" if owner_alive(r.state) else "running or interrupted",
            "interrupted": "interrupted (its process is gone; `--resume` continues it)",
            "stopped": f"{r.state.get('error', 'stopped')} (`--resume` continues it)",
            "failed": f"failed: {r.state.get('error', 'see its state.json')}",
            "not started": "not started",
            "empty": "folder exists but the stage never started",
        }.get(r.status, r.status)
        if r.status in ("running", "interrupted", "stopped", "failed"):
            what += "; shown from what it logged so far" if r.has_data else "; nothing logged yet"
        lines.append(f"- `{r.name}` ({r.kind}): {what}")
    return lines


def render_index(report: Report) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    lines = [
        f"# wprctl report: {report.project}",
        "",
        f"Generated {when} from `{report.manifest}`; runs read from `{report.output_dir}`.",
        "Regenerate with `wprctl report"
        + (f" -m {report.manifest}" if report.manifest else "")
        + "`.",
        "",
    ]
    if report.empty:
        lines += [
            "**Nothing to report yet**: no stage has finished or logged metrics. Run the "
            "pipeline first (`wprctl run`), then `wprctl report` again.",
            "",
        ]
    lines += [
        "## Stages",
        "",
        stages_table(report.runs).markdown(),
        "",
        *_missing_lines(report),
        "",
    ]
    for section in report.sections:
        lines += [f"## {section.heading}", ""]
        for table in section.tables:
            lines += [table.markdown(), ""]
        for fig in section.figures:
            lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.file})", "", fig.caption, ""]
    if report.figures:
        lines += ["## Figures", ""]
        lines += [f"- [{f.file}]({f.file}): {f.title}" for f in report.figures]
        lines.append("")
    return "\n".join(lines)


def print_report(report: Report, echo: Callable[[Any], None]) -> None:
    """The report's tables on the terminal, then where the files are."""
    echo(stages_table(report.runs).rich())
    for section in report.sections:
        for table in section.tables:
            echo(table.rich())
