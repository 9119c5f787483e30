"""Stages: thin recipes that read the manifest, call library code and write artifacts.

Each stage module exposes `run(manifest, run, resuming) -> dict[str, float]` (its final metrics)
and `OUTPUT_KEYS`. `execute_stage` does what every stage shares: variants, the multi-process
re-launch, the run folder's life cycle (prepare, fail, finish) and error reporting.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

from wprctl.errors import RunError, StopRequested, UserError, WprctlError
from wprctl.manifest import Manifest, load_manifest
from wprctl.runs import RunDir, fail_run, prepare_run, run_dir, settle_replaced, stop_run

STAGE_MODULES = {
    "sft": "wprctl.stages.sft",
    "rm": "wprctl.stages.rm",
    "ppo": "wprctl.stages.ppo",
    "dar": "wprctl.stages.dar",
}
PREPARED_ENV = "WPRCTL_PREPARED"
RANK_ERROR_PREFIX = ".error.rank"
RESUMING_ENV = "WPRCTL_RESUMING"


def resolve_variant(manifest: Manifest, kind: str, variant: str | None) -> tuple[Manifest, str]:
    if variant is None:
        return manifest, kind
    v = manifest.variant(variant)
    if v is None:
        names = [x.name for x in manifest.variants if x.stage == kind]
        raise UserError(
            f"{manifest.source}: no variant {variant!r} in [[variants]]"
            + (f"; {kind} variants: {', '.join(names)}" if names else "")
        )
    if v.stage != kind:
        # infer, judge and apps-eval take their variants through `wprctl run` only
        how = (
            f"wprctl {v.stage} --variant {variant}"
            if v.stage in STAGE_MODULES
            else f"wprctl run --from {variant} --to {variant}"
        )
        raise UserError(f"variant {variant!r} is of stage {v.stage}, not {kind}; run `{how}`")
    return manifest.for_variant(variant), variant


def resume_hint(run: RunDir) -> str:
    command = f"wprctl {run.kind}" + (f" --variant {run.name}" if run.name != run.kind else "")
    if run.has_checkpoint():
        return f"`{command} --resume` continues from the last checkpoint"
    return f"no checkpoint yet: `{command} --force` starts it again"


# Signals that end a rank, by number; a status that would name another one is an exit code.
# not SIGHUP: the launcher's status for it, 255, is also a plain exit(-1)
_ENDING_SIGNALS = {s.value: s.name for s in (signal.SIGINT, signal.SIGABRT, signal.SIGBUS,
                                            signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM)}  # fmt: skip


def ending_signal(code: int) -> int | None:
    """The signal that ended a rank, from the launcher's status, if one did. DeepSpeed's launcher
    exits with the rank's returncode, minus the signal for a killed rank (sys.exit(-9) is status
    247); a shell, or a rank that handled the signal itself, reports 128 + the signal."""
    signum = 256 - code if code >= 192 else code - 128 if code > 128 else 0
    return signum if signum in _ENDING_SIGNALS else None


def exit_status(code: int) -> str:
    """How a rank ended, for a message."""
    signum = ending_signal(code)
    if signum is None:
        return f"exited with status {code}"
    why = " (out of memory? the kernel's OOM killer sends it)" if signum == signal.SIGKILL else ""
    return f"was ended by {_ENDING_SIGNALS[signum]}{why} (status {code})"


def execute_stage(
    kind: str,
    manifest_path: Path,
    overrides: list[str] | None,
    *,
    variant: str | None = None,
    resume: bool = False,
    force: bool = False,
    num_processes: int | None = None,
    argv: list[str] | None = None,
) -> dict[str, float] | None:
    from wprctl.launch import relaunch, under_launcher

    manifest, name = resolve_variant(load_manifest(manifest_path, overrides), kind, variant)
    nproc = num_processes or manifest.deepspeed.num_processes
    # batch sizes are per process: a run's config must say how many there were
    world = {"world_size": nproc if not under_launcher() else int(os.environ.get("WORLD_SIZE", 1))}
    if nproc > 1 and not under_launcher():
        run, resuming = prepare_run(
            manifest, name, kind, resume=resume, force=force, extra_config=world
        )
        if resuming and run.status == "finished":
            return _already_finished(run)
        os.environ[PREPARED_ENV] = "1"
        os.environ[RESUMING_ENV] = "1" if resuming else "0"
        for stale in run.root.glob(f"{RANK_ERROR_PREFIX}*"):  # an earlier run's, never read
            stale.unlink()
        hostfile = manifest.deepspeed.hostfile
        code, signum = relaunch(
            nproc,
            argv if argv is not None else sys.argv[1:],
            hostfile=manifest.locate(hostfile) if hostfile else None,
            master_port=manifest.deepspeed.master_port,
        )
        said, silent = _rank_errors(run, nproc) if code != 0 else ("", [])
        if code != 0 and signum:
            state = run.state()
            if state.get("status") == "stopped":
                how = f"{state['error']}; {resume_hint(run)}"
            else:  # stopped before the training loop, or killed while saving
                fail_run(run, "interrupted")
                how = f"interrupted; {run.root} keeps what was saved ({resume_hint(run)})"
            kept = settle_replaced(manifest, run, succeeded=False)
            # a rank that failed while stopping said why
            raise StopRequested(
                signum, message=(f"{said}\n" if said else "") + f"{name}: " + (kept or how)
            )
        if code != 0:
            how = f"a process {exit_status(code)}"
            fail_run(run, said or how)
            kept = settle_replaced(manifest, run, succeeded=False)
            if code == 2:  # the ranks said what was wrong with the input; no need to resume
                raise UserError((said or f"{name}: bad input") + (f"\n{kept}" if kept else ""))
            if said and silent:  # the others' errors may only follow from losing these ranks
                said += f"\nrank {', '.join(map(str, silent))} ended without a message"
            if said and ending_signal(code) is None:
                raise RunError(said + (f"\n{kept}" if kept else ""))
            raise RunError(
                f"{name}: {how}; "
                + (kept or f"partial output is in {run.root} ({resume_hint(run)})")
            )
        settle_replaced(manifest, run, succeeded=True)
        return run.state().get("metrics", {})

    module = importlib.import_module(STAGE_MODULES[kind])
    if os.environ.get(PREPARED_ENV) == "1":
        run = run_dir(manifest, name, kind)
        resuming = os.environ.get(RESUMING_ENV) == "1"
    else:
        if under_launcher():
            from wprctl.engine import barrier, init_distributed, rank

            init_distributed()
            if rank() == 0:
                run, resuming = prepare_run(
                    manifest, name, kind, resume=resume, force=force, extra_config=world
                )
            barrier()
            run = run_dir(manifest, name, kind)
            resuming = resume and run.has_checkpoint()
        else:
            run, resuming = prepare_run(
                manifest, name, kind, resume=resume, force=force, extra_config=world
            )
        if resuming and run.status == "finished":
            return _already_finished(run)
    from wprctl.console import err_console

    # ranks started by the re-launch above leave the run folder's fate to their parent
    owner = os.environ.get(PREPARED_ENV) != "1"

    def settle(succeeded: bool) -> str | None:
        return settle_replaced(manifest, run, succeeded=succeeded) if owner else None

    rank = int(os.environ.get("RANK", "0"))

    def for_parent(exc: WprctlError) -> WprctlError:
        """A rank of a re-launch leaves its message to the parent, which says it once."""
        if not owner and run.root.exists():
            (run.root / f"{RANK_ERROR_PREFIX}{rank}").write_text(str(exc), encoding="utf-8")
            exc.quiet = True
        return exc

    try:
        metrics = module.run(manifest, run, resuming)
    except StopRequested as exc:
        stop_run(run, str(exc))
        settle(False)
        stopped = StopRequested(exc.signum, exc.step, f"{name}: {exc}; {resume_hint(run)}")
        stopped.quiet = not owner  # the parent says it, from state.json
        raise stopped from None
    except WprctlError as exc:
        fail_run(run, str(exc))
        kept = settle(False)
        if kept:
            err_console.print(f"note: {kept}")
        raise for_parent(exc) from None
    except KeyboardInterrupt:
        fail_run(run, "interrupted")
        kept = settle(False)
        err_console.print(
            f"{name}: interrupted; "
            + (kept or f"{run.root} keeps what was saved ({resume_hint(run)})")
        )
        raise
    except Exception as exc:
        fail_run(run, f"{type(exc).__name__}: {exc}")
        kept = settle(False)
        log = run.root / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        if kept:  # the folder is the previous run's again, which did not fail
            log = log.with_name("forced-run-" + log.name)
        if run.root.exists():
            log.write_text(traceback.format_exc(), encoding="utf-8")
        raise for_parent(
            RunError(
                f"{name} failed: {type(exc).__name__}: {exc}\n  traceback: {log}\n  "
                + (kept or f"partial output: {run.root} ({resume_hint(run)})")
            )
        ) from exc
    settle(True)
    return metrics


def _rank_errors(run: RunDir, nproc: int) -> tuple[str, list[int]]:
    """The ranks' error messages (see ``for_parent``), each distinct one once, and the ranks
    that left none (killed, most likely); the files go."""
    said: dict[str, list[int]] = {}
    for rank in range(nproc):
        path = run.root / f"{RANK_ERROR_PREFIX}{rank}"
        if path.exists():
            said.setdefault(path.read_text(encoding="utf-8"), []).append(rank)
            path.unlink()
    silent = [r for r in range(nproc) if not any(r in ranks for ranks in said.values())]
    if len(said) == 1:
        return next(iter(said)), silent
    text = "\n".join(f"rank {', '.join(map(str, r))}: {t}" for t, r in said.items())
    return text, silent


def _already_finished(run: RunDir) -> dict[str, float]:
    from wprctl.console import console

    console.print(f"{run.name}: already finished ({run.root}); nothing to resume")
    return run.state().get("metrics", {})
