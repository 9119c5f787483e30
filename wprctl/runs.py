"""Run directories, lineage and metric logging.

Every stage run lives in `<output_dir>/<name>/` (name = the stage, or a variant's name):

    config.json      the resolved manifest and the run's own settings
    state.json       status (running | finished | failed), times, outputs, final metrics; the
                     owner's pid and host, so a run whose process is gone reads "interrupted"
    metrics.jsonl    one JSON object per logged step: {"step": ..., "<name>": float, ...}
    tb/              TensorBoard events
    checkpoints/     DeepSpeed checkpoints (resumable), the last K kept
    model/           the final Hugging Face folder (save_pretrained, safetensors)

`<output_dir>/lineage.json` records which run produced what, so a later stage defaults to the
outputs of earlier ones (PPO's actor = the SFT model, its critic and reward = the RM model).
Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wprctl.console import is_main_process
from wprctl.errors import UserError
from wprctl.jsonl import write_text_atomic
from wprctl.manifest import STAGE_KINDS, Manifest, dump_resolved

LINEAGE_FILE = "lineage.json"

# The finished runs the current stage has read, by name, with the time each had finished: noted
# as names resolve (``note_input``), kept in the stage's own lineage entry, so that a run whose
# input was redone later reads as stale (``stale_inputs``) instead of silently out of date.
_INPUTS: dict[str, float] = {}


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path}: unreadable ({exc}); delete it or restore it from a backup"
        ) from None


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return math.nan


def owner_alive(state: dict[str, Any]) -> bool | None:
    """Is the process that marked this run "running" still alive? None when it cannot be told.

    A pid is only meaningful on the host that wrote it (a shared file system may hold runs of
    other machines), and pids are reused: the live process must also have been started when the
    recorded one was.
    """
    pid, host, born = state.get("pid"), state.get("host"), state.get("pid_started")
    if (
        not isinstance(pid, int)
        or not isinstance(born, int | float)
        or host != socket.gethostname()
    ):
        return None
    now = _process_started(pid)
    if now is None:
        return False
    if math.isnan(now):
        return None
    return abs(now - born) < 1.0


def run_status(state: dict[str, Any], exists: bool) -> str:
    """finished | running | interrupted (its process is gone) | stopped (on request, with a
    checkpoint) | failed | empty | absent."""
    status = state.get("status")
    if status is None:
        return "empty" if exists else "absent"
    if status == "running" and owner_alive(state) is False:
        return "interrupted"
    return str(status)


@dataclass
class RunDir:
    """One stage run's folder and its bookkeeping."""

    root: Path
    name: str
    kind: str

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def state(self) -> dict[str, Any]:
        """state.json, with its outputs as paths under this project's output folder."""
        return located(_read_json(self.state_file) or {}, self.root.parent)

    @property
    def status(self) -> str:
        return run_status(self.state(), self.root.exists())

    @property
    def replaced_dir(self) -> Path:
        """Where --force keeps the previous run until the new one can stand in for it."""
        return self.root.parent / ".replaced" / self.name

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_dir / "latest").exists()

    def update_state(self, **fields: Any) -> None:
        """Set ``fields`` in state.json; a field set to None is removed."""
        if not is_main_process():
            return
        state = _read_json(self.state_file) or {}
        state.update(fields)
        _write_json_atomic(self.state_file, {k: v for k, v in state.items() if v is not None})


def run_dir(manifest: Manifest, name: str, kind: str | None = None) -> RunDir:
    return RunDir(manifest.output_dir / name, name, kind or name)


def prepare_run(
    manifest: Manifest,
    name: str,
    kind: str,
    *,
    resume: bool,
    force: bool,
    extra_config: dict[str, Any] | None = None,
) -> tuple[RunDir, bool]:
    """Create or reopen a run folder. Returns (run, resuming).

    A finished run is never silently overwritten: it needs --force (start over) or --resume
    (nothing to do). A started run needs --resume (continue) or --force (start over).
    """
    run = run_dir(manifest, name, kind)
    state = run.state()
    status = run_status(state, run.root.exists())
    if force and resume:
        raise UserError("--force and --resume contradict each other; pick one")
    if status == "finished" and not force:
        if resume:
            return run, True
        raise UserError(
            f"{run.root}: stage {name!r} has already finished. Use --force to start over "
            "(this deletes its outputs) or --resume to keep them."
        )
    if status == "running" and owner_alive(state) and state.get("pid") != os.getpid():
        # Two processes on one folder interleave their logs and checkpoints, and --force would
        # delete the folder under the live one; SIGKILLed runs read "interrupted" instead.
        raise UserError(
            f"{run.root}: stage {name!r} is running now (pid {state.get('pid')} on "
            f"{state.get('host', 'this host')}). Wait for it to finish or stop it first."
        )
    if status in ("running", "interrupted", "stopped", "failed", "empty") and not (force or resume):
        raise UserError(
            f"{run.root}: stage {name!r} has a partial run ({status}). Use --resume to continue "
            "from its last checkpoint or --force to start over."
        )
    resuming = resume and run.root.exists() and status != "absent"
    _INPUTS.clear()
    if is_main_process():
        if force and run.root.exists():
            _set_aside(run)
        run.root.mkdir(parents=True, exist_ok=True)
        config = {"stage": kind, "name": name, "manifest": dump_resolved(manifest)}
        if extra_config:
            config.update(extra_config)
        changed = _changed_settings(_read_json(run.config_file), config) if resuming else {}
        if changed:
            _report_changes(run, changed)
        _write_json_atomic(run.config_file, config)
        run.update_state(
            status="running",
            kind=kind,
            # resuming without a checkpoint starts from step 0: its time starts now too
            started=state.get("started", time.time())
            if resuming and run.has_checkpoint()
            else time.time(),
            pid=os.getpid(),
            pid_started=_process_started(os.getpid()),
            host=socket.gethostname(),
            # how the last attempt ended: this one speaks for the run now
            error=None,
            failed=None,
            stopped=None,
        )
    return run, resuming


def _set_aside(run: RunDir) -> None:
    # Not deleted yet: a --force run that fails on bad input (a mistyped model path, a broken
    # data file) must not have destroyed the finished run it was meant to replace.
    aside = run.replaced_dir
    if aside.exists() and not run.has_checkpoint():
        # an earlier --force run was killed (SIGKILL, a power cut) before it saved anything:
        # the run it was replacing is still the one worth keeping, the killed attempt is not
        shutil.rmtree(run.root)
        return
    if aside.exists():
        shutil.rmtree(aside)
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run.root, aside)


def settle_replaced(manifest: Manifest, run: RunDir, *, succeeded: bool) -> str | None:
    """After a --force run: the previous run goes once the new one finished or saved a
    checkpoint (it can then be resumed); otherwise the previous run is put back as it was.
    Returns a note for the user when it was put back."""
    aside = run.replaced_dir
    if not is_main_process() or not aside.exists():
        return None
    if succeeded or run.has_checkpoint():
        shutil.rmtree(aside)
        if not succeeded:  # lineage still names the previous run's outputs, now gone
            lineage = _read_json(manifest.output_dir / LINEAGE_FILE) or {}
            if lineage.pop(run.name, None) is not None:
                _write_json_atomic(manifest.output_dir / LINEAGE_FILE, lineage)
        return None
    shutil.rmtree(run.root, ignore_errors=True)
    os.replace(aside, run.root)
    return f"{run.root}: the previous run is kept as it was (--force starts over only once it runs)"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def settings_changed_since(manifest: Manifest, run: RunDir) -> dict[str, tuple[Any, Any]]:
    """The settings of the run's own section, the data and the model that differ between the
    run's config.json and ``manifest`` (what the stage would run with now). Other sections are
    left out: a changed judge setting does not make the SFT run another one."""
    new = {"manifest": dump_resolved(manifest)}
    own = (f"{run.kind}.", "data.", "model.")
    changed = _changed_settings(_read_json(run.config_file), new)
    return {key: change for key, change in changed.items() if key.startswith(own)}


def _changed_settings(old: Any, new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Manifest keys whose value differs between a run's config.json and the resumed run's."""
    if not isinstance(old, dict):
        return {}

    def settings(config: dict[str, Any]) -> dict[str, Any]:
        own = {k: v for k, v in config.items() if k not in ("stage", "name", "manifest")}
        return {**_flatten(config.get("manifest", {})), **_flatten(own)}

    before, after = settings(old), settings(new)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def describe_changes(changed: dict[str, tuple[Any, Any]], limit: int) -> str:
    """``key old -> new`` for the first ``limit`` changes, and how many more there are."""
    shown = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return "; ".join(shown[:limit]) + more


def _report_changes(run: RunDir, changed: dict[str, tuple[Any, Any]]) -> None:
    """A resume may change settings on purpose (more steps, a lower lr); it must not do so
    silently, since config.json then describes only the part after the resume."""
    from wprctl.console import console

    console.print(
        f"[bold yellow]note:[/] resuming {run.name} with changed settings: "
        f"{describe_changes(changed, 8)}. config.json now holds the new ones; state.json "
        "records the change under 'resumes'."
    )
    state = _read_json(run.state_file) or {}
    resumes = state.get("resumes", [])
    resumes.append(
        {"time": time.time(), "changed": {k: [old, new] for k, (old, new) in changed.items()}}
    )
    run.update_state(resumes=resumes)


def check_resume_step(run: RunDir, step: int, total: int, keys: str) -> None:
    """A checkpoint past the run's length would "finish" at once, claiming ``total`` steps."""
    if step > total:
        raise UserError(
            f"{run.root}: its checkpoint is at step {step}, past this run's {total} steps "
            f"({keys}). Raise it to train on from step {step}, or use "
            "--force to start over."
        )


def finish_run(
    manifest: Manifest, run: RunDir, outputs: dict[str, str], metrics: dict[str, float]
) -> None:
    """Mark a run finished and record its outputs in the project's lineage."""
    if not is_main_process():
        return
    clean = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
    stored = portable(outputs, manifest.output_dir)
    now = time.time()
    run.update_state(status="finished", finished=now, outputs=stored, metrics=clean)
    lineage = _read_json(manifest.output_dir / LINEAGE_FILE) or {}
    lineage[run.name] = {
        "kind": run.kind,
        "inputs": dict(_INPUTS),
        "outputs": stored,
        "metrics": clean,
        "finished": now,
    }
    _write_json_atomic(manifest.output_dir / LINEAGE_FILE, lineage)


def fail_run(run: RunDir, message: str) -> None:
    if run.root.exists():
        run.update_state(status="failed", error=message, failed=time.time())


def stop_run(run: RunDir, message: str) -> None:
    """A run that checkpointed and stopped on request (Ctrl-C, SIGTERM): resumable, not failed."""
    if run.root.exists():
        run.update_state(status="stopped", error=message, stopped=time.time())


def read_lineage(manifest: Manifest) -> dict[str, Any]:
    """lineage.json, each entry's outputs as paths under this project's output folder."""
    base = manifest.output_dir
    lineage = _read_json(base / LINEAGE_FILE) or {}
    return {name: located(entry, base) for name, entry in lineage.items()}


@dataclass
class ProjectRun:
    """One run of a project as `wprctl status` and the report both see it."""

    name: str
    kind: str
    dir: RunDir
    state: dict[str, Any]  # state.json ({} when absent)
    entry: dict[str, Any]  # its lineage record ({} unless it finished)
    status: str  # run_status, or "finished" from the lineage alone, "empty", "not started"
    stale_inputs: list[str]  # for a finished run: inputs redone since it read them

    @property
    def record(self) -> dict[str, Any]:
        """What speaks for the run's outputs and metrics: its state.json, or the lineage's record
        when that is lost. Never a mix: a run redone since has its own (none, while it runs),
        and the lineage still names the run it replaced."""
        return self.state or self.entry


def project_runs(
    manifest: Manifest, read_state: Callable[[Path], Any] | None = None
) -> list[ProjectRun]:
    """Every stage named in the manifest, in the lineage or with a run folder, in that order.

    ``read_state`` reads a state.json (default: strictly, an unreadable one is bad input; the
    report passes a lenient reader, since a stage may be writing it)."""
    read = read_state or _read_json
    base = manifest.output_dir
    lineage = read_lineage(manifest)
    on_disk = sorted(p.parent.name for p in base.glob("*/state.json"))
    runs = []
    for name in dict.fromkeys([*manifest.stages, *lineage, *on_disk]):
        entry = lineage.get(name, {})
        state = located(read(base / name / "state.json") or {}, base)
        variant = manifest.variant(name)
        kind = (
            entry.get("kind")
            or state.get("kind")
            or (variant.stage if variant else None)
            or (name if name in STAGE_KINDS else None)
        )
        if kind is None:  # a folder that is no stage's
            continue
        run = run_dir(manifest, name, kind)
        if state.get("status"):
            status = run_status(state, True)
        elif entry:  # state.json lost, but lineage records the run's outputs
            status = "finished"
        else:
            status = "empty" if run.root.exists() else "not started"
        stale = stale_inputs(lineage, name) if status == "finished" else []
        runs.append(ProjectRun(name, kind, run, state, entry, status, stale))
    return runs


def portable(outputs: dict[str, str], base: Path) -> dict[str, str]:
    """Outputs inside ``base`` (the output folder) relative to it, others absolute.

    state.json and lineage.json keep these, so a project that is copied or moved reads its own
    models, not the ones at the old place (or nothing, once the old place is gone).
    """
    out = {}
    for key, value in outputs.items():
        path = Path(value).resolve()
        try:
            out[key] = path.relative_to(base.resolve()).as_posix()
        except ValueError:
            out[key] = str(path)
    return out


def located(record: dict[str, Any], base: Path) -> dict[str, Any]:
    """A state or lineage record with its ``outputs`` made absolute against ``base``."""
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        return record
    absolute = {
        key: str(base / value)
        if isinstance(value, str) and not Path(value).is_absolute()
        else value
        for key, value in outputs.items()
    }
    return {**record, "outputs": absolute}


def note_input(name: str, entry: dict[str, Any]) -> None:
    """The current stage reads the finished run ``name`` (its lineage ``entry``)."""
    finished = entry.get("finished")
    if isinstance(finished, int | float):
        _INPUTS[name] = float(finished)


def note_output_path(lineage: dict[str, Any], path: Path, key: str) -> None:
    """The current stage reads ``path``: if it is a finished run's output ``key``, that run is an
    input as if named, so redoing it makes the current stage's result stale."""
    for name, entry in lineage.items():
        output = entry.get("outputs", {}).get(key)
        if output and Path(output).resolve() == path.resolve():
            note_input(name, entry)


def stale_inputs(lineage: dict[str, Any], name: str) -> list[str]:
    """The runs upstream of finished run ``name`` that were redone (or removed) after their
    results flowed into it: its own inputs, and theirs (a judgement of answers sampled from a
    policy trained on a reward model that was retrained since is out of date too). A report's
    own inputs only: it shows every run it read with that run's staleness, so only redoing one of
    them makes the report itself out of date."""
    redone: set[str] = set()
    seen = {name}
    todo = [name]
    transitive = lineage.get(name, {}).get("kind") != "report"
    while todo:
        for k, t in lineage.get(todo.pop(), {}).get("inputs", {}).items():
            if lineage.get(k, {}).get("finished") != t:
                redone.add(k)
            elif transitive and k not in seen:
                seen.add(k)
                todo.append(k)
    return sorted(redone)


TRAINING_KINDS = ("sft", "rm", "ppo", "dar")  # the stages that make a model


def names_a_run(manifest: Manifest, ref: str) -> bool:
    """A training stage's or a variant's name, as opposed to a path."""
    return manifest.variant(ref) is not None or ref in TRAINING_KINDS


def resolve_model_ref(manifest: Manifest, ref: str, *, what: str = "model") -> Path:
    """A stage or variant name (its finished output) or a path to a Hugging Face folder."""
    lineage = read_lineage(manifest)
    if ref in lineage:
        model = lineage[ref].get("outputs", {}).get("model")
        if model:
            note_input(ref, lineage[ref])
            return Path(model)
    path = Path(manifest.locate(ref)).expanduser()
    if path.exists():
        note_output_path(lineage, path, "model")
        return path
    variant = manifest.variant(ref)
    kind = variant.stage if variant else lineage.get(ref, {}).get("kind")
    if kind is not None and kind not in TRAINING_KINDS:
        raise UserError(
            f"{what}: {ref!r} is not a training stage (it is of stage {kind}, which makes no "
            "model); name a training stage or variant, or a model folder"
        )
    if names_a_run(manifest, ref):
        state = run_dir(manifest, ref).status
        command = f"wprctl {kind} --variant {ref}" if variant else f"wprctl {ref}"
        raise UserError(
            f"{what}: stage {ref!r} has no finished output under {manifest.output_dir} "
            f"(its status is {state}). Run `{command}` first or point to a model folder."
        )
    raise UserError(f"{what}: {ref!r} is neither a finished stage of this project nor a path")


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, run: RunDir, *, resume_from_step: int | None = None) -> None:
        self.enabled = is_main_process()
        self.path = run.metrics_file
        self._tb = None
        if not self.enabled:
            return
        if resume_from_step is not None and self.path.exists():
            # Steps logged after the checkpoint we resume from will be logged again; drop them so
            # the file reads as one uninterrupted run.
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_from_step
            ]
            self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        elif resume_from_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # the killed run's event file keeps its steps after the checkpoint; purge_step has
            # TensorBoard hide them, as metrics.jsonl drops them above
            purge = None if resume_from_step is None else resume_from_step + 1
            self._tb = SummaryWriter(log_dir=str(run.tb_dir), purge_step=purge)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self._tb = None

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            name = f"{prefix}{key}"
            row[name] = float(value)
            if self._tb is not None:
                self._tb.add_scalar(name, float(value), int(step))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill; the rest of the file is still good
    return rows
