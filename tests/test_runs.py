"""Run folders' bookkeeping: outputs that move with the project, and who owns a running run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from wprctl.errors import UserError
from wprctl.manifest import load_manifest
from wprctl.runs import finish_run, owner_alive, prepare_run, resolve_model_ref, run_dir


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "wprctl.toml").write_text('[project]\noutput_dir = "runs"\n')
    return root / "wprctl.toml"


def test_a_copied_or_moved_project_reads_its_own_outputs(tmp_path: Path) -> None:
    manifest = load_manifest(_project(tmp_path / "a"))
    run, _ = prepare_run(manifest, "sft", "sft", resume=False, force=False)
    run.model_dir.mkdir()
    outside = tmp_path / "elsewhere.jsonl"
    finish_run(manifest, run, {"model": str(run.model_dir), "jsonl": str(outside)}, {"loss": 1.0})
    stored = json.loads((manifest.output_dir / "lineage.json").read_text())["sft"]["outputs"]
    assert stored == {"model": "sft/model", "jsonl": str(outside)}

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # moved: the old place is gone
    moved = load_manifest(tmp_path / "b" / "wprctl.toml")
    own = tmp_path / "b" / "runs" / "sft" / "model"
    assert resolve_model_ref(moved, "sft") == own
    assert run_dir(moved, "sft").state()["outputs"] == {"model": str(own), "jsonl": str(outside)}
    from wprctl.report.collect import collect_runs

    sft = next(r for r in collect_runs(moved) if r.name == "sft")
    assert sft.state["outputs"]["model"] == str(own)


def test_a_run_is_owned_by_the_live_process_that_started_it_and_no_other() -> None:
    import psutil

    me = {
        "pid": os.getpid(),
        "pid_started": psutil.Process().create_time(),
        "host": socket.gethostname(),
    }
    assert owner_alive(me) is True
    # the same pid, but a process started at another time: the pid was reused
    assert owner_alive({**me, "pid_started": me["pid_started"] - 3600}) is False
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert owner_alive({**me, "pid": gone.pid, "pid_started": time.time()}) is False
    # written on another machine, or by a wprctl that did not record the owner: cannot tell
    assert owner_alive({**me, "host": "another-host"}) is None
    assert owner_alive({"pid": os.getpid()}) is None


def test_a_run_whose_input_was_redone_reads_as_stale(tmp_path: Path) -> None:
    from wprctl.project import stage_status
    from wprctl.report.collect import collect_runs
    from wprctl.runs import read_lineage, stale_inputs

    manifest = load_manifest(_project(tmp_path / "p"))

    def finish(name: str, *, force: bool = False, reads: str | None = None) -> None:
        run, _ = prepare_run(manifest, name, name, resume=False, force=force)
        if reads is not None:
            resolve_model_ref(manifest, reads)  # what a stage does with rm.model = "sft"
        run.model_dir.mkdir()
        finish_run(manifest, run, {"model": str(run.model_dir)}, {})

    finish("sft")
    finish("rm", reads="sft")
    finish("ppo", reads="rm")  # and, through rm, on sft
    finish("infer", reads=str(manifest.output_dir / "sft" / "model"))  # a path is the run too
    assert read_lineage(manifest)["rm"]["inputs"].keys() == {"sft"}
    assert stale_inputs(read_lineage(manifest), "rm") == []
    finish("sft", force=True)  # SFT redone: the reward model was trained on the old one
    assert stale_inputs(read_lineage(manifest), "rm") == ["sft"]
    assert stale_inputs(read_lineage(manifest), "ppo") == ["sft"]  # stale through rm
    assert stale_inputs(read_lineage(manifest), "infer") == ["sft"]
    rows = {r["name"]: r for r in stage_status(manifest)}
    assert rows["rm"]["stale_inputs"] == ["sft"] and rows["sft"]["stale_inputs"] == []
    runs = {r.name: r for r in collect_runs(manifest)}
    assert runs["rm"].stale_inputs == ["sft"]
    finish("rm", force=True, reads="sft")
    assert stale_inputs(read_lineage(manifest), "rm") == []
    assert stale_inputs(read_lineage(manifest), "ppo") == ["rm"]  # it read the old rm

    # a judgement of an inference file named by its path goes stale when the inference is redone
    from wprctl.pipeline import _jsonl_of

    gens = manifest.output_dir / "infer" / "gens.jsonl"
    run, _ = prepare_run(manifest, "infer", "infer", resume=False, force=True)
    gens.write_text("{}\n")
    finish_run(manifest, run, {"jsonl": str(gens)}, {})
    run, _ = prepare_run(manifest, "judge", "judge", resume=False, force=False)
    assert _jsonl_of(manifest, str(gens), "judge.a") == str(gens)
    finish_run(manifest, run, {}, {})
    assert stale_inputs(read_lineage(manifest), "judge") == []
    run, _ = prepare_run(manifest, "infer", "infer", resume=False, force=True)
    gens.write_text("{}\n")
    finish_run(manifest, run, {"jsonl": str(gens)}, {})
    assert stale_inputs(read_lineage(manifest), "judge") == ["infer"]

    # a report goes stale when a run it shows is redone, not for a run shown stale in it (ppo)
    run, _ = prepare_run(manifest, "report", "report", resume=False, force=False)
    collect_runs(manifest)
    finish_run(manifest, run, {}, {})
    assert read_lineage(manifest)["report"]["inputs"].keys() == {
        "sft",
        "rm",
        "ppo",
        "infer",
        "judge",
    }
    assert stale_inputs(read_lineage(manifest), "report") == []
    finish("rm", force=True, reads="sft")
    assert stale_inputs(read_lineage(manifest), "report") == ["rm"]

    # `wprctl status` and the report agree, also on a run known from the lineage alone (a report
    # does not show itself)
    (manifest.output_dir / "ppo" / "state.json").unlink()
    (manifest.output_dir / "stray").mkdir()  # a folder that is no stage's
    said = {r["name"]: (r["status"], r["stale_inputs"]) for r in stage_status(manifest)}
    seen = {r.name: (r.status, r.stale_inputs) for r in collect_runs(manifest)}
    assert said.pop("report") == ("finished", ["rm"])
    assert said == seen and said["ppo"] == ("finished", ["rm"]) and "stray" not in said

    # a run redone since speaks for itself: while it runs, nothing of the run it replaces shows
    # (the lineage still names that run's file and figures until the new one finishes)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("{}\n")
    Path(f"{rows_file}.summary.json").write_text('{"reward_mean": 0.5}')
    run, _ = prepare_run(manifest, "infer", "infer", resume=False, force=True)
    finish_run(manifest, run, {"jsonl": str(rows_file)}, {"reward_mean": 0.5})
    (manifest.output_dir / "infer" / "state.json").unlink()  # known from the lineage alone
    before = next(r for r in collect_runs(manifest) if r.name == "infer")
    assert before.summary == {"reward_mean": 0.5} and before.last("reward_mean") == 0.5
    prepare_run(manifest, "infer", "infer", resume=False, force=True)
    row = next(r for r in stage_status(manifest) if r["name"] == "infer")
    again = next(r for r in collect_runs(manifest) if r.name == "infer")
    assert row["status"] == again.status == "running"
    assert row["outputs"] == {} and row["metrics"] == {}
    assert again.summary is None and again.last("reward_mean") is None

    # a finished run whose model was deleted since is said to miss it
    assert next(r for r in stage_status(manifest) if r["name"] == "rm")["missing_outputs"] == []
    shutil.rmtree(manifest.output_dir / "rm" / "model")
    row = next(r for r in stage_status(manifest) if r["name"] == "rm")
    assert row["status"] == "finished" and row["missing_outputs"] == ["model"]


def test_a_force_run_killed_before_its_first_checkpoint_does_not_cost_the_run_it_replaced(
    tmp_path: Path,
) -> None:
    """--force sets the finished run aside until the new one can stand in for it. When the new
    one is SIGKILLed before that, a second --force still falls back to the finished run, not to
    the killed attempt, if it too fails."""
    from wprctl.runs import settle_replaced

    manifest = load_manifest(_project(tmp_path / "p"))
    run, _ = prepare_run(manifest, "sft", "sft", resume=False, force=False)
    run.model_dir.mkdir()
    (run.model_dir / "weights").write_text("finished")
    finish_run(manifest, run, {"model": str(run.model_dir)}, {"loss": 1.0})

    prepare_run(manifest, "sft", "sft", resume=False, force=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    run.update_state(pid=dead.pid)  # SIGKILLed: its process is gone, nothing settled
    assert run.status == "interrupted" and run.replaced_dir.exists()
    from wprctl.project import stage_status

    (row,) = [r for r in stage_status(manifest) if r["name"] == "sft"]
    assert row["set_aside"] == str(run.replaced_dir)  # `wprctl status` says where it is
    assert row["outputs"] == {}  # not the set-aside run's, which the lineage still names

    run, _ = prepare_run(manifest, "sft", "sft", resume=False, force=True)
    assert settle_replaced(manifest, run, succeeded=False)  # e.g. bad input in the new run
    assert run.status == "finished" and (run.model_dir / "weights").read_text() == "finished"
    assert not run.replaced_dir.exists()


def test_a_model_input_that_names_an_evaluation_stage_says_so(tmp_path: Path) -> None:
    path = _project(tmp_path / "p")
    path.write_text(
        path.read_text() + '[[variants]]\nname = "gens"\nstage = "infer"\n'
        '[[variants]]\nname = "ppo-kl"\nstage = "ppo"\n'
    )
    manifest = load_manifest(path)
    run, _ = prepare_run(manifest, "gens", "infer", resume=False, force=False)
    finish_run(manifest, run, {"jsonl": str(run.root / "samples.jsonl")}, {})
    with pytest.raises(UserError, match="'gens' is not a training stage .*of stage infer"):
        resolve_model_ref(manifest, "gens", what="infer.model")
    with pytest.raises(
        UserError, match=r"'ppo-kl' has no finished output .*`wprctl ppo --variant ppo-kl`"
    ):
        resolve_model_ref(manifest, "ppo-kl", what="infer.model")
    with pytest.raises(UserError, match="'nope' is neither a finished stage"):
        resolve_model_ref(manifest, "nope")
