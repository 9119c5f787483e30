"""`wprctl apps-eval`: run generated programs against APPS tests (sandboxed), report pass@k."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, ManifestOpt, SetOpt
from wprctl.errors import UserError
from wprctl.jsonl import read_jsonl


def register(app: typer.Typer) -> None:
    app.command("apps-eval")(apps_eval)


def apps_eval(
    generations: Annotated[
        Path,
        typer.Argument(
            help="Generations JSONL: {id, response, sample} rows (or `responses` lists)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Per-(problem, sample) results JSONL.")],
    problems: Annotated[
        str | None,
        typer.Option(
            "--problems",
            help="APPS problems: local .jsonl/.json/.parquet file or folder, or a hub id.",
        ),
    ] = None,
    k: Annotated[
        str | None, typer.Option("--k", help="Comma-separated k values, e.g. 1,5,10.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Wall-clock seconds per test.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Parallel sandboxes.")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="Output comparison: strict (default) or compat (APPS)."),
    ] = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    overrides: SetOpt = None,
) -> None:
    """Run generated programs against APPS tests (sandboxed) and report pass@k."""
    from wprctl.codeexec import ExecConfig, evaluate_samples, load_problems, summarize
    from wprctl.codeexec.executor import check_samples, folders_of
    from wprctl.codeexec.partial import PartialResults, fingerprint
    from wprctl.console import console
    from wprctl.jsonl import check_output_file

    apps = _apps_section(manifest, overrides)
    ks = _parse_k(k) if k is not None else list(apps.k)
    if mode is not None and mode not in ("strict", "compat"):
        raise UserError(f"--mode: expected strict or compat, got {mode!r}")
    try:
        config = ExecConfig.from_apps(apps, timeout=timeout, workers=workers, mode=mode)
    except ValueError as exc:
        raise UserError(f"apps settings: {exc}") from None
    source = problems or apps.problems
    if not source:
        raise UserError(
            "no APPS problems given: pass --problems FILE|HUB_ID (or set apps.problems in the manifest)"
        )
    check_output_file(out, [generations, source])
    rows = read_generations(generations)
    problem_set = load_problems(source)
    samples = [(r["id"], r["response"]) for r in rows]
    hide = folders_of(generations, source)
    # here already (evaluate_samples checks too): the fingerprints below index the problems
    check_samples(problem_set, (pid for pid, _ in samples))
    partial = PartialResults(out)
    keys = [fingerprint(problem_set[r["id"]], r["sample"], r["response"], config) for r in rows]
    earlier = partial.load()
    done = {j: earlier[key] for j, key in enumerate(keys) if key in earlier}
    if done:
        console.print(
            f"apps-eval: {len(done)} of {len(rows)} samples already evaluated by an interrupted "
            f"run ({partial.path}); running the other {len(rows) - len(done)}"
        )
    t0 = time.monotonic()
    results = evaluate_samples(
        problem_set,
        samples,
        config,
        progress=True,
        sample_indices=[r["sample"] for r in rows],
        hide=hide,
        done=done,
        on_result=lambda j, res: partial.append(keys[j], res),
    )
    elapsed = time.monotonic() - t0
    from wprctl.codeexec.sandbox import probe_isolation

    summary = summarize(
        results,
        ks,
        mode=config.mode,
        timeout=config.timeout,
        sandbox=probe_isolation(config.sandbox).describe(),
        elapsed_s=round(elapsed, 3),  # this run's; reused results took their time before
        samples_per_s=round((len(results) - len(done)) / elapsed, 2) if elapsed > 0 else None,
        reused_samples=len(done),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row, res in zip(rows, results):
            d = res.to_dict()
            extra = {
                key: v
                for key, v in row.items()
                if key not in ("response", "responses") and key not in d
            }
            fh.write(json.dumps({**d, **extra}) + "\n")
    summary_path = out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    partial.remove()
    print_summary(summary, ks)
    console.print(f"wrote {out} and {summary_path}")


def _apps_section(manifest: Path, overrides: list[str] | None) -> Any:
    from wprctl.manifest import AppsConfig, load_manifest

    if manifest.exists() or manifest != DEFAULT_MANIFEST or overrides:
        m = load_manifest(manifest, overrides)
        return m.with_located(m.apps, "problems")  # a problems file beside the manifest
    return AppsConfig()


def _parse_k(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(
            f"--k: expected comma-separated positive integers like 1,5,10, got {text!r}"
        ) from None
    if not ks or ks[0] < 1:
        raise UserError(
            f"--k: expected comma-separated positive integers like 1,5,10, got {text!r}"
        )
    return ks


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Rows `{id, response, sample}`; a row with a `responses` list becomes one row per entry."""
    rows: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    lines: dict[tuple[str, int], int] = {}  # where each (id, sample) was read
    for n, row in read_jsonl(path):
        if "id" not in row:
            raise UserError(
                f"{path}, line {n}: expected an object with an `id` (the APPS problem_id)"
            )
        pid = str(row["id"])
        if "responses" in row:
            texts = row["responses"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise UserError(f"{path}, line {n}: `responses` must be a list of strings")
        elif isinstance(row.get("response"), str):
            texts = [row["response"]]
        else:
            raise UserError(f"{path}, line {n}: expected a string `response` or a list `responses`")
        for text in texts:
            sample = row.get("sample") if "responses" not in row else None
            if sample is None:
                sample = counters.get(pid, 0)
            if not isinstance(sample, int):
                raise UserError(f"{path}, line {n}: `sample` must be an integer, got {sample!r}")
            if (pid, sample) in lines:  # counted twice, it would pass twice in pass@k
                raise UserError(
                    f"{path}, line {n}: problem {pid} sample {sample} is also on line "
                    f"{lines[pid, sample]}; each (id, sample) may appear once"
                )
            lines[pid, sample] = n
            counters[pid] = max(counters.get(pid, 0), sample + 1)
            base = {
                key: v for key, v in row.items() if key not in ("responses", "response", "sample")
            }
            rows.append({**base, "id": pid, "response": text, "sample": sample})
    if not rows:
        raise UserError(f"{path}: no generations")
    return rows


def print_summary(summary: dict[str, Any], ks: list[int]) -> None:
    from rich.table import Table

    from wprctl.console import console, print_table

    table = Table(title=f"APPS execution ({summary.get('mode', '')} comparison)")
    table.add_column("level", no_wrap=True)
    table.add_column("probs", justify="right")
    table.add_column("samples", justify="right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")
    table.add_column("strict", justify="right")
    table.add_column("tests", justify="right")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def add(name: str, m: dict[str, Any], style: str | None = None) -> None:
        table.add_row(
            name,
            str(m["n_problems"]),
            str(m["n_samples"]),
            *[pct(m["pass@k"][str(k)]) for k in ks],
            pct(m["strict_accuracy"]),
            pct(m["test_case_average"]),
            style=style,
        )

    for name, m in summary["by_difficulty"].items():
        add(name, m)
    add("all", summary, style="bold")
    print_table(table)
    if summary.get("pass@k_note"):
        console.print(f"[yellow]note:[/] {summary['pass@k_note']}")
    verdicts = ", ".join(f"{k}={v}" for k, v in sorted(summary["verdicts"].items()))
    console.print("strict = strict accuracy (all tests pass), tests = test-case average")
    console.print(
        f"tests run: {summary['n_tests']} ({verdicts}); sandbox: {summary.get('sandbox', '')}"
    )
