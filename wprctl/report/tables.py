"""The report's tables: one structure, rendered by rich in the terminal and as markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.report.collect import Run

DIFFICULTY_ORDER = ("introductory", "interview", "competition")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [
            "| " + " | ".join(cell(c) for c in self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, title_justify="left", caption=self.note or None)
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _arrow(start: float | None, end: float | None) -> str:
    if start is None:
        return fmt(end)
    return f"{fmt(start, 3)} → {fmt(end, 3)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def stages_table(runs: Sequence[Run]) -> Table:
    rows = []
    for r in runs:
        outputs = r.state.get("outputs", {})
        main = outputs.get("model") or outputs.get("jsonl") or ""
        detail = r.state.get("error") or main
        if not r.finished and r.rows:
            detail = f"{len(r.rows)} metric rows, last step {r.last_step}"
        status = r.status
        if r.stale_inputs:
            status += f" (stale: {', '.join(r.stale_inputs)} redone since)"
        rows.append([r.name, r.kind, status, _duration(r.seconds), str(detail)])
    return Table("Stages", ["stage", "kind", "status", "time", "output / detail"], rows)


def regularizer_label(run: Run) -> str:
    if run.kind == "dar":
        return "dar"
    reg = run.config.get("manifest", {}).get("ppo", {}).get("regularizer", {})
    kind = reg.get("kind")
    if kind == "wpr":
        wpr = reg.get("wpr", {})
        parts = [wpr.get("method", "?")]
        if wpr.get("gauge") == "centered":
            parts.append("centered")
        return f"wpr ({', '.join(parts)})"
    if kind == "kl":
        return f"kl ({reg.get('kl', {}).get('estimator', '?')})"
    if kind == "fdiv":
        return f"fdiv ({reg.get('fdiv', {}).get('divergence', '?')})"
    return kind or "?"


def sft_table(runs: Sequence[Run]) -> Table:
    rows = [
        [
            r.label,
            fmt(r.last_step),
            _arrow(r.first("train/loss"), r.last("train/loss")),
            _arrow(r.first("eval/loss"), r.last("eval/loss")),
            fmt(r.last("eval/ppl")),
        ]
        for r in runs
    ]
    return Table(
        "Supervised fine-tuning",
        ["run", "steps", "train loss (first → last)", "eval loss (first → last)", "eval ppl"],
        rows,
    )


def rm_table(runs: Sequence[Run]) -> Table:
    rows = [
        [
            r.label,
            fmt(r.last_step),
            fmt(r.last("train/loss")),
            _arrow(r.first("eval/loss"), r.last("eval/loss")),
            _arrow(r.first("eval/accuracy"), r.last("eval/accuracy")),
            fmt(r.last("eval/margin")),
        ]
        for r in runs
    ]
    return Table(
        "Reward model",
        ["run", "steps", "train loss", "eval loss", "eval accuracy", "eval margin"],
        rows,
    )


def policy_table(runs: Sequence[Run]) -> Table:
    rows = []
    for r in runs:
        beta = r.last("train/beta")
        rows.append(
            [
                r.label,
                regularizer_label(r),
                fmt(beta) if beta is not None else "",
                fmt(r.last_step),
                fmt(r.last("train/reward")),
                _arrow(r.first("eval/reward"), r.last("eval/reward")),
                _arrow(r.first("eval/gold"), r.last("eval/gold")),
                fmt(r.last("eval/kl_ref")),
                fmt(r.last("eval/length")),
            ]
        )
    return Table(
        "Policy optimisation",
        [
            "run",
            "regularizer",
            "beta",
            "steps",
            "train reward",
            "eval reward",
            "eval gold",
            "eval KL",
            "eval length",
        ],
        rows,
        note="train reward: the last rollout batch. eval: held-out prompts, step 0 → the last "
        "evaluation; KL is k1 KL to the reference policy.",
    )


def infer_table(runs: Sequence[Run]) -> Table:
    rows = []
    for r in runs:
        s = r.summary or {}
        mean, std = s.get("reward_mean"), s.get("reward_std")
        reward = fmt(mean) + (f" ± {fmt(std, 3)}" if std is not None else "")
        rows.append(
            [
                r.label,
                str(s.get("model", "")),
                fmt(s.get("n")),
                reward,
                fmt(s.get("oracle_mean", s.get("gold_mean"))),
                fmt(s.get("length_mean")),
                fmt(s.get("eos_fraction")),
                fmt(s.get("rouge1")),
                fmt(s.get("rougeL")),
            ]
        )
    return Table(
        "Inference on held-out prompts",
        ["run", "model", "rows", "reward", "gold", "length", "eos", "ROUGE-1", "ROUGE-L"],
        rows,
    )


def ci95(summary: dict[str, Any], key: str = "ci95") -> tuple[float, float] | None:
    ci = summary.get(key)
    if (
        isinstance(ci, list | tuple)
        and len(ci) == 2
        and all(isinstance(x, int | float) for x in ci)
    ):
        return float(ci[0]), float(ci[1])
    return None


def judge_sides(run: Run, names_by_file: dict[str, str]) -> tuple[str, str]:
    s = run.summary or {}

    def side(key: str) -> str:
        path = s.get(key)
        if not path:
            return key.upper()
        name = names_by_file.get(str(Path(path).resolve()))
        if name is None:
            # a copied or moved project: its judge summaries name the files at the old place
            tail = Path(path).parts[-2:]
            moved = {n for f, n in names_by_file.items() if Path(f).parts[-2:] == tail}
            name = moved.pop() if len(moved) == 1 else Path(path).stem
        return name

    return side("a"), side("b")


def judge_table(runs: Sequence[Run], names_by_file: dict[str, str]) -> Table:
    # a local or free judge costs nothing; the column only appears when something was spent
    costs = [(r.summary or {}).get("cost_usd") for r in runs]
    paid = any(isinstance(c, int | float) and c > 0 for c in costs)
    rows = []
    for r, cost in zip(runs, costs, strict=True):
        s = r.summary or {}
        a, b = judge_sides(r, names_by_file)
        ci = ci95(s)
        row = [
            r.label,
            f"{a} vs {b}",
            f"{fmt(s.get('wins'))}/{fmt(s.get('ties'))}/{fmt(s.get('losses'))}"
            + (f" +{s['invalid']} invalid" if s.get("invalid") else ""),
            fmt(s.get("win_rate"), 3),
            f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–",
            fmt(s.get("win_rate_no_ties"), 3),
            fmt(s.get("flip_rate"), 3),
        ]
        if paid:
            row.append(f"${cost:.4f}" if isinstance(cost, int | float) else "–")
        rows.append(row)
    columns = ["run", "A vs B", "W/T/L", "win rate", "95% CI", "no ties", "flips"]
    return Table(
        "Pairwise judge (A's point of view)",
        columns + (["cost"] if paid else []),
        rows,
        note="win rate counts ties as half (no ties: wins / (wins + losses)); the 95% interval "
        "is a bootstrap over pairs; flips: verdicts that changed with the order of A and B.",
    )


def apps_ks(runs: Sequence[Run]) -> list[str]:
    ks = {k for r in runs for k in (r.summary or {}).get("pass@k", {})}
    return sorted(ks, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def difficulties(runs: Sequence[Run]) -> list[str]:
    found = {d for r in runs for d in (r.summary or {}).get("by_difficulty", {})}
    return [d for d in DIFFICULTY_ORDER if d in found] + sorted(found - set(DIFFICULTY_ORDER))


def apps_table(runs: Sequence[Run]) -> Table:
    ks = apps_ks(runs)
    rows = []
    for r in runs:
        s = r.summary or {}
        groups = [
            ("all", s),
            *((d, s.get("by_difficulty", {}).get(d)) for d in difficulties(runs)),
        ]
        for label, g in groups:
            if not g:
                continue
            passk = g.get("pass@k", {})
            rows.append(
                [
                    r.label if label == "all" else "",
                    label,
                    fmt(g.get("n_problems")),
                    fmt(g.get("n_samples")),
                    *(fmt(passk.get(k), 3) for k in ks),
                    fmt(g.get("strict_accuracy"), 3),
                    fmt(g.get("test_case_average"), 3),
                ]
            )
    return Table(
        "APPS unit tests",
        [
            "run",
            "difficulty",
            "problems",
            "samples",
            *(f"pass@{k}" for k in ks),
            "strict acc.",
            "test-case avg",
        ],
        rows,
    )
