"""`wprctl run`: the manifest's `stages` in order, each a stage kind or a named variant.

Finished stages are skipped, partial ones resumed from their last checkpoint, and the first
failure stops the run with the stage's own message. Training stages (sft, rm, ppo, dar) run
through `wprctl.stages.execute_stage`; evaluation stages (infer, judge, apps-eval, report) run
their own commands with the variant's overrides as `--set` options and an output under the
stage's run folder, and are recorded in the lineage like any other stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.console import console, print_table, short_metrics
from wprctl.errors import StopRequested, UserError
from wprctl.manifest import Manifest, load_manifest
from wprctl.runs import (
    TRAINING_KINDS,
    RunDir,
    describe_changes,
    finish_run,
    note_input,
    note_output_path,
    prepare_run,
    read_lineage,
    run_dir,
    settings_changed_since,
    settle_replaced,
    stale_inputs,
)

JUDGE_CACHE = "judge_cache.sqlite"  # in the output folder, shared by the judge stages


@dataclass
class StageOutcome:
    name: str
    kind: str
    status: str  # done | skipped | failed
    seconds: float
    metrics: dict[str, float]
    output: str


def select_stages(manifest: Manifest, start: str | None, stop: str | None) -> list[str]:
    names = list(manifest.stages)
    for label, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise UserError(f"{label} {value!r}: not in the manifest's stages ({', '.join(names)})")
    i = names.index(start) if start else 0
    j = names.index(stop) + 1 if stop else len(names)
    if i >= j:
        raise UserError(
            f"--from {start!r} comes after --to {stop!r} in the manifest's stages ({', '.join(names)})"
        )
    return names[i:j]


def _sets(values: dict[str, Any]) -> list[str]:
    """A variant's overrides as `--set KEY=VALUE` arguments (values written as TOML)."""
    args = []
    for key, value in values.items():
        # JSON spells strings, numbers, booleans and lists the way TOML reads them.
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _jsonl_of(manifest: Manifest, ref: str, what: str) -> str:
    lineage = read_lineage(manifest)
    if ref in lineage and lineage[ref].get("outputs", {}).get("jsonl"):
        note_input(ref, lineage[ref])
        return lineage[ref]["outputs"]["jsonl"]
    local = manifest.locate(ref)
    if Path(local).exists():
        note_output_path(lineage, Path(local), "jsonl")
        return local
    raise UserError(f"{what}: {ref!r} is neither a finished inference stage nor a file")


def _invoke(args: list[str]) -> None:
    from wprctl.cli import app

    app(args=args, standalone_mode=False)


def _eval_stage(
    manifest_path: Path,
    overrides: list[str],
    base: Manifest,
    name: str,
    kind: str,
    *,
    force: bool = False,
) -> dict[str, float]:
    variant = base.variant(name)
    m = base.for_variant(name) if variant else base
    run, _ = prepare_run(m, name, kind, resume=not force, force=force)
    try:
        metrics = _eval_outputs(manifest_path, overrides, m, run, name, kind)
    except BaseException:
        if note := settle_replaced(m, run, succeeded=False):
            console.print(f"[yellow]{note}[/]")
        raise
    settle_replaced(m, run, succeeded=True)
    return metrics


def _eval_outputs(
    manifest_path: Path, overrides: list[str], m: Manifest, run: RunDir, name: str, kind: str
) -> dict[str, float]:
    """Run one evaluation stage's command into its run folder and finish the run."""
    variant = m.variant(name)
    sets = _set_args(overrides) + _sets(variant.set if variant else {})
    common = ["-m", str(manifest_path), *sets]
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}
    if kind == "infer":
        out = run.root / "samples.jsonl"
        _invoke(["infer", *common, "--out", str(out)])
        outputs["jsonl"] = str(out)
        metrics = _summary_metrics(
            out, ("reward_mean", "oracle_mean", "length_mean", "rouge1", "rougeL")
        )
    elif kind == "judge":
        if not (m.judge.a and m.judge.b):
            raise UserError(
                f"stage {name!r}: a judge stage needs judge.a and judge.b (inference stages or files)"
            )
        a, b = (
            _jsonl_of(m, m.judge.a, f"{name}: judge.a"),
            _jsonl_of(m, m.judge.b, f"{name}: judge.b"),
        )
        out = run.root / "judgements.jsonl"
        # One cache for the project's judge stages, outside their run folders: its replies are
        # keyed by endpoint, model, template and texts, so a judge stage redone (--force,
        # --stale) on the same answers asks the API for nothing again.
        cache = m.output_dir / JUDGE_CACHE
        _invoke(["judge", a, b, "--out", str(out), "--cache", str(cache), *common])
        outputs["jsonl"] = str(out)
        metrics = _summary_metrics(out, ("win_rate", "flip_rate", "invalid"))
    elif kind == "apps-eval":
        gen = m.apps.generations
        if not gen:
            raise UserError(f"stage {name!r}: an apps-eval stage needs apps.generations")
        if not (m.apps.problems or m.data.path):
            raise UserError(f"stage {name!r}: apps-eval needs apps.problems or data.path")
        # passed on the command line, where a relative path is the working directory's
        problems = m.locate(m.apps.problems or m.data.path or "")
        if gen in ("reference", "weakened"):
            from wprctl.codeexec import load_problems, reference_generations

            rows = reference_generations(
                load_problems(problems), 3, weaken=gen == "weakened", seed=m.project.seed
            )
            gen_file = run.root / "generations.jsonl"
            gen_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            gen = str(gen_file)
        else:
            gen = _jsonl_of(m, gen, f"{name}: apps.generations")
        out = run.root / "results.jsonl"
        _invoke(["apps-eval", gen, "--problems", str(problems), "--out", str(out), *common])
        outputs["jsonl"] = str(out)
        metrics = _summary_metrics(out, ("strict_accuracy", "test_case_average"))
    elif kind == "report":
        _invoke(["report", "-m", str(manifest_path), *_set_args(overrides)])
        outputs["report"] = str(m.output_dir / "report")
    else:  # pragma: no cover - the manifest validates stage kinds
        raise UserError(f"stage {name!r}: unknown kind {kind!r}")
    outputs["summary"] = outputs.get("jsonl", "") and str(
        Path(outputs["jsonl"]).with_name(Path(outputs["jsonl"]).name + ".summary.json")
    )
    finish_run(m, run, {k: v for k, v in outputs.items() if v}, metrics)
    return metrics


def _summary_metrics(out: Path, keys: tuple[str, ...]) -> dict[str, float]:
    path = out.with_name(out.name + ".summary.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    found = {}
    for key in keys:
        value = data.get(key)
        if isinstance(value, int | float):
            found[key] = float(value)
    if "pass@k" in data:
        for k, v in data["pass@k"].items():
            if isinstance(v, int | float):
                found[f"pass@{k}"] = float(v)
    return found


def run_pipeline(
    manifest_path: Path,
    overrides: list[str] | None = None,
    *,
    start: str | None = None,
    stop: str | None = None,
    num_processes: int | None = None,
    force: bool = False,
    redo_stale: bool = False,
) -> list[StageOutcome]:
    """``force``: the selected stages start over, finished or not (as each stage's --force).
    ``redo_stale``: so do the finished ones whose inputs were redone since they read them; a stage
    redone here makes the ones after it that read it stale in turn, so they are redone too."""
    from wprctl.stages import execute_stage

    overrides = list(overrides or [])
    base = load_manifest(manifest_path, overrides)
    outcomes: list[StageOutcome] = []
    for name in select_stages(base, start, stop):
        variant = base.variant(name)
        kind = variant.stage if variant else name
        run = run_dir(base, name, kind)
        status = run.status
        stale = stale_inputs(read_lineage(base), name) if status == "finished" else []
        over = force or bool(redo_stale and stale)
        if status == "finished" and not over:
            state = run.state()
            outcomes.append(
                StageOutcome(
                    name, kind, "skipped", 0.0, state.get("metrics", {}), _main_output(state)
                )
            )
            redo = f"`wprctl run --from {name} --to {name} --force` redoes it"
            why = []
            if stale:
                why.append(f"stale: {', '.join(stale)} redone since")
            if changed := settings_changed_since(base.for_variant(name) if variant else base, run):
                why.append(f"run with other settings: {describe_changes(changed, 4)}")
            console.print(
                f"[dim]{name}: finished earlier, skipped[/]"
                + (f" [yellow]({'; '.join(why)}; {redo})[/]" if why else "")
            )
            continue
        if status == "absent":
            start_note = ""
        elif stale:
            start_note = f" — starting over (stale: {', '.join(stale)} redone since)"
        elif force:
            start_note = " — starting over"
        elif kind in TRAINING_KINDS and not run.has_checkpoint():
            start_note = " — starting over (no checkpoint to resume from)"
        else:
            start_note = " — resuming"
        console.rule(f"[bold]{name}[/] ({kind}){start_note}")
        t0 = time.time()
        try:
            if kind in TRAINING_KINDS:
                # ranks started for this stage run this stage's command, not the whole pipeline
                argv = [kind, "-m", str(manifest_path), *_set_args(overrides)]
                argv += ["--variant", name] if variant else []
                metrics = execute_stage(
                    kind, manifest_path, overrides, variant=name if variant else None,
                    resume=status != "absent" and not over, force=over,
                    num_processes=num_processes, argv=argv,
                ) or {}  # fmt: skip
            else:
                metrics = _eval_stage(manifest_path, overrides, base, name, kind, force=over)
        except BaseException as exc:
            how = "stopped" if isinstance(exc, StopRequested) else "failed"
            outcomes.append(StageOutcome(name, kind, how, time.time() - t0, {}, str(run.root)))
            print_summary(outcomes)
            raise
        state = run_dir(base, name, kind).state()
        outcomes.append(
            StageOutcome(name, kind, "done", time.time() - t0, metrics, _main_output(state))
        )
    print_summary(outcomes)
    return outcomes


def _main_output(state: dict[str, Any]) -> str:
    outputs = state.get("outputs", {})
    return outputs.get("model") or outputs.get("jsonl") or outputs.get("report") or ""


def print_summary(outcomes: list[StageOutcome]) -> None:
    from rich.table import Table

    table = Table(title="wprctl run")
    for col in ("stage", "kind", "status", "time", "key metrics", "output"):
        table.add_column(col, overflow="fold")
    colors = {"done": "green", "skipped": "dim", "stopped": "yellow", "failed": "red"}
    for o in outcomes:
        shown = {k: v for k, v in o.metrics.items() if not k.endswith("_start")}
        metrics = short_metrics(shown)
        table.add_row(
            o.name,
            o.kind,
            f"[{colors[o.status]}]{o.status}[/]",
            f"{o.seconds:.0f}s" if o.seconds else "",
            metrics,
            o.output,
        )
    print_table(table)
