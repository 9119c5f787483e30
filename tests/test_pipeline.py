"""`wprctl quickstart` end to end (--small), and `wprctl run` skipping and resuming stages."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import kill_after_checkpoint, run_cli

EXPECTED_PLOTS = {
    "sft_loss.png", "rm_training.png", "policy_reward.png", "policy_penalty.png", "policy_kl.png",
    "policy_gold.png", "frontier.png", "judge_win_rates.png", "apps_passk.png",
}  # fmt: skip


@pytest.fixture(scope="module")
def quickstart_small(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("qs") / "demo"
    res = run_cli("quickstart", str(root), "--small", timeout=1800)
    return root, res


def test_quickstart_runs_every_stage_and_reports(
    quickstart_small: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, res = quickstart_small
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "Report:" in res.stdout and "What to try next" in res.stdout
    status = json.loads(run_cli("status", "-m", str(root / "wprctl.toml"), "--json").stdout)
    by_name = {r["name"]: r for r in status["stages"]}
    manifest_stages = [r["name"] for r in status["stages"]][:17]
    assert all(by_name[n]["status"] == "finished" for n in manifest_stages), by_name
    # SFT learned, the judge ran through the local oracle server with intervals, APPS separated
    # the reference solutions from the weakened ones.
    sft = by_name["sft"]["metrics"]
    assert sft["eval/loss"] < 6.0
    judge = json.loads(Path(by_name["judge-wpr-vs-kl"]["outputs"]["summary"]).read_text())
    lo, hi = judge["ci95"]
    assert (
        0.0 <= lo <= judge["win_rate"] <= hi <= 1.0
        and judge["requests"] > 0
        and judge["invalid"] == 0
    )
    good = json.loads(Path(by_name["apps-reference"]["outputs"]["summary"]).read_text())
    weak = json.loads(Path(by_name["apps-weakened"]["outputs"]["summary"]).read_text())
    assert good["strict_accuracy"] > weak["strict_accuracy"] + 0.2
    report = root / "runs" / "report"
    index = (report / "index.md").read_text()
    for name in EXPECTED_PLOTS:
        png = report / name
        assert png.exists(), name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image as mpimg

        h, w = mpimg.imread(png).shape[:2]
        assert w >= 400 and h >= 300, (name, w, h)
        assert name in index


def test_run_again_skips_finished_stages(
    quickstart_small: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, res = quickstart_small
    assert res.returncode == 0
    t0 = time.time()
    again = run_cli("run", "-m", str(root / "wprctl.toml"), "--set", "sft.max_steps=40")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 17
    assert time.time() - t0 < 120


def test_a_judge_stage_redone_on_the_same_answers_asks_for_nothing_again(
    quickstart_small: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """The judge stages share one cache outside their run folders, which --force replaces."""
    import shutil

    root, res = quickstart_small
    assert res.returncode == 0
    copy = tmp_path / "demo"
    shutil.copytree(root, copy)  # the other tests read the fixture's project as it is
    manifest = str(copy / "wprctl.toml")
    stage = ["--from", "judge-wpr-vs-kl", "--to", "judge-wpr-vs-kl"]
    again = run_cli("run", "-m", manifest, *stage, "--force")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = copy / "runs" / "judge-wpr-vs-kl" / "judgements.jsonl.summary.json"
    said = json.loads(summary.read_text())
    # every pair judged in both orders, all from the cache; no request sent
    assert said["judged"] == said["pairs"] > 0 and said["cache_hits"] == 2 * said["pairs"]
    assert said["requests"] == 0


def test_run_resumes_a_killed_stage(tmp_path: Path) -> None:
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0
    manifest = str(tmp_path / "wprctl.toml")
    sets = ["--set", 'stages=["sft", "rm"]', "--set", "model.tiny.hidden_size=32", "--set", "model.tiny.intermediate_size=64",
            "--set", "data.demo.n_train=300", "--set", "data.demo.n_validation=40", "--set", "sft.max_steps=4",
            "--set", "rm.max_steps=8", "--set", "rm.save_every=2", "--set", "rm.batch_size=8", "--set", "sft.batch_size=8"]  # fmt: skip
    kill_after_checkpoint(
        ["run", "-m", manifest, *sets], tmp_path / "runs" / "rm" / "checkpoints" / "latest"
    )
    res = run_cli("run", "-m", manifest, *sets)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sft: finished earlier, skipped" in res.stdout
    assert "rm: resumed from step" in res.stdout
    status = json.loads(run_cli("status", "-m", manifest, *sets, "--json").stdout)
    assert [r["status"] for r in status["stages"]][:2] == ["finished", "finished"]
    # a stage redone: the stages that read it are said to be stale when skipped
    res = run_cli("run", "-m", manifest, *sets, "--from", "sft", "--to", "sft", "--force")
    assert res.returncode == 0 and "sft (sft) — starting over" in res.stdout, res.stderr[-3000:]
    # ... and one run with other settings than the manifest's now, so is that
    res = run_cli("run", "-m", manifest, *sets, "--set", "rm.lr=0.002")
    flat = " ".join(res.stdout.split())
    assert (
        "rm: finished earlier, skipped (stale: sft redone since; run with other settings: rm.lr"
        in flat
    )
    assert "-> 0.002; `wprctl run --from rm --to rm --force` redoes it)" in flat
    assert "sft: finished earlier, skipped (" not in flat  # its settings did not change
    # --stale redoes what read a redone stage, and nothing else
    res = run_cli("run", "-m", manifest, *sets, "--stale")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rm (rm) — starting over (stale: sft redone since)" in res.stdout
    assert "sft: finished earlier, skipped" in res.stdout
    res = run_cli("run", "-m", manifest, *sets, "--stale")
    assert res.stdout.count("finished earlier, skipped") == 2 and "stale" not in res.stdout
    res = run_cli("run", "-m", manifest, *sets, "--from", "rm", "--to", "sft")
    assert res.returncode == 2 and "--from 'rm' comes after --to 'sft'" in res.stderr


def test_run_from_to_and_unknown_stage(tmp_path: Path) -> None:
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0
    res = run_cli("run", "-m", str(tmp_path / "wprctl.toml"), "--from", "nope")
    assert res.returncode == 2 and "not in the manifest's stages" in res.stderr


@pytest.mark.parametrize(
    ("pipeline", "sample"),
    [
        ("tldr", "real_tldr_cnndm.jsonl"),
        ("hh-rlhf", "real_hh_rlhf.jsonl"),
        ("apps", "real_apps.jsonl"),
    ],
)
def test_paper_pipelines_start_offline_on_local_data(
    tmp_path: Path, pipeline: str, sample: str
) -> None:
    """The paper's pipelines, pointed at local rows in the hub's schema and the tiny model."""
    repo = Path(__file__).resolve().parents[1]
    res = run_cli(
        "run", "-m", str(repo / "pipelines" / f"{pipeline}.toml"), "--to", "sft",
        "--set", f"project.output_dir={tmp_path / 'runs'}", "--set", "model.base=tiny",
        "--set", f"data.path={repo / 'tests' / 'fixtures' / 'data' / sample}",
        "--set", "deepspeed.num_processes=1", "--set", "data.data_split=1,0,0",
        "--set", "sft.max_steps=2", "--set", "sft.batch_size=1",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "sft" / "state.json").read_text())
    assert state["status"] == "finished" and state["metrics"]["steps"] == 2.0
    assert (tmp_path / "runs" / "sft" / "model" / "config.json").exists()


def test_run_with_two_processes_launches_each_stage_by_itself(tmp_path: Path) -> None:
    """The ranks launched for a stage run that stage only. They used to run `wprctl run` again,
    and went on to the later stages themselves: unprepared (no config.json), each eval stage
    once per rank, the summary printed once per rank."""
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0
    sets = ["--set", 'stages=["sft", "rm"]', "--set", "model.tiny.hidden_size=32", "--set", "model.tiny.intermediate_size=64",
            "--set", "data.demo.n_train=300", "--set", "data.demo.n_validation=40", "--set", "sft.max_steps=4",
            "--set", "rm.max_steps=4", "--set", "rm.batch_size=8", "--set", "sft.batch_size=8"]  # fmt: skip
    # without OMP_NUM_THREADS, the ranks share the cores out (the suite sets it for its workers)
    res = run_cli("run", "-m", str(tmp_path / "wprctl.toml"), *sets, "--num-processes", "2",
                  env={"OMP_NUM_THREADS": None})  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    each = f"{threads} CPU thread{'s' if threads > 1 else ''} each"
    assert res.stderr.count(f"launching 2 processes with DeepSpeed, {each}") == 2, res.stderr
    rules = [line for line in res.stdout.splitlines() if line.startswith("───")]
    assert len(rules) == 2 and "sft (sft)" in rules[0] and "rm (rm)" in rules[1], rules
    assert res.stdout.count("rm: done after 4 steps") == 1
    assert "finished earlier, skipped" not in res.stdout
    for stage in ("sft", "rm"):
        config = json.loads((tmp_path / "runs" / stage / "config.json").read_text())
        assert config["world_size"] == 2


def test_run_force_redoes_a_finished_evaluation_stage(
    quickstart_small: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """An evaluation stage (here apps-eval) has no command of its own to --force: `run --force`
    redoes it, and the run it replaced is not kept once the new one finished."""
    root, res = quickstart_small
    assert res.returncode == 0
    manifest = str(root / "wprctl.toml")
    state_file = root / "runs" / "apps-reference" / "state.json"
    before = json.loads(state_file.read_text())["finished"]
    res = run_cli("run", "-m", manifest, "--from", "apps-reference", "--to", "apps-reference",
                  "--force")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = json.loads(state_file.read_text())
    assert state["status"] == "finished" and state["finished"] > before
    assert (root / "runs" / state["outputs"]["summary"]).exists()  # stored relative to runs/
    assert not (root / "runs" / ".replaced" / "apps-reference").exists()
