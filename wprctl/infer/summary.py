"""Figures of an inference file: reward, length, eos, ROUGE against the references, and the
reference responses' own mean reward; printed as a table and saved as `<out>.summary.json`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SUMMARY_TASKS = ("tldr", "demo")  # datasets whose responses are summaries (ROUGE applies)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    """Population standard deviation (numpy's default, as the paper's scripts report)."""
    if not values:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def row_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rewards = [float(r["reward"]) for r in rows if isinstance(r.get("reward"), int | float)]
    lengths = [float(r["length"]) for r in rows if isinstance(r.get("length"), int | float)]
    eos = [bool(r["eos"]) for r in rows if "eos" in r]
    figures: dict[str, Any] = {
        "n": len(rows),
        "n_prompts": len({str(r["id"]) for r in rows}),
        "reward_mean": _mean(rewards),
        "reward_std": _std(rewards),
        "length_mean": _mean(lengths),
        "eos_fraction": _mean([float(e) for e in eos]),
    }
    oracle = [float(r["oracle"]) for r in rows if isinstance(r.get("oracle"), int | float)]
    if oracle:
        figures["oracle_mean"] = _mean(oracle)
    return figures


def rouge_figures(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """ROUGE-1/2/L of each response against its row's reference (rows without one are left out)."""
    from wprctl.metrics import rouge

    pairs = [(r["response"], r["reference"]) for r in rows if isinstance(r.get("reference"), str)]
    if not pairs:
        return {"rouge1": None, "rouge2": None, "rougeL": None}
    scores = rouge([p for p, _ in pairs], [ref for _, ref in pairs])
    return {k: scores.get(k) for k in ("rouge1", "rouge2", "rougeL")}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


LABELS = (
    ("n", "rows"),
    ("n_prompts", "prompts"),
    ("reward_mean", "reward mean"),
    ("reward_std", "reward std"),
    ("length_mean", "length mean (tokens)"),
    ("eos_fraction", "ended with eos"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("reference_reward_mean", "reference reward mean"),
    ("oracle_mean", "oracle (demo gold) mean"),
)


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.table import Table

    from wprctl.console import print_table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in LABELS:
        if key in summary:
            table.add_row(label, _fmt(summary[key]))
    print_table(table)
