"""`wprctl quickstart` end to end (--small), and `wprctl run` skipping and resuming stages."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from signal import SIGKILL

import pytest

from tests.conftest import kill_after_checkpoint, run_cli, signal_after_first_step

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
    # killed before its first checkpoint: the next run says it starts over, not that it resumes
    longer = ["--set", "sft.max_steps=100000", "--set", "sft.log_every=1"]
    res = signal_after_first_step(["run", "-m", manifest, *sets, *longer],
                                  tmp_path / "runs" / "sft" / "metrics.jsonl", SIGKILL)  # fmt: skip
    assert res.returncode == -SIGKILL
    res = run_cli("run", "-m", manifest, *sets, "--to", "sft")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sft (sft) — starting over (no checkpoint to resume from)" in res.stdout
    kill_after_checkpoint(
        ["run", "-m", manifest, *sets], tmp_path / "runs" / "rm" / "checkpoints" / "latest"
    )
    res = run_cli("run", "-m", manifest, *sets)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sft: finished earlier, skipped" in res.stdout
    assert "rm (rm) — resuming" in res.stdout and "rm: resumed from step" in res.stdout
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


def _tiny_gpt2(out: Path, tokenizer: object) -> Path:
    """A tiny GPT-2 folder: another architecture than the tiny Llama (learned positions, a
    Conv1D-based block, no pad id in its config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("pipeline", "sample", "model"),
    [
        ("tldr", "real_tldr_cnndm.jsonl", "gpt2"),
        ("hh-rlhf", "real_hh_rlhf.jsonl", "tiny"),
        ("apps", "real_apps.jsonl", "tiny"),
    ],
)
def test_paper_pipelines_run_offline_on_local_data(
    tmp_path: Path, tiny_tokenizer: object, pipeline: str, sample: str, model: str
) -> None:
    """The paper's pipelines, every stage, pointed at local rows in the hub's schema and a tiny
    model, with their own engine settings (PPO's critic on ZeRO-3 with offload, which failed at
    start-up until the offloaded optimizer became DeepSpeed's CPU Adam)."""
    import tomllib
    from transformers import AutoConfig

    repo = Path(__file__).resolve().parents[1]
    manifest = repo / "pipelines" / f"{pipeline}.toml"
    base = str(_tiny_gpt2(tmp_path / "gpt2", tiny_tokenizer)) if model == "gpt2" else model
    res = run_cli(
        "run", "-m", str(manifest),
        "--set", f"project.output_dir={tmp_path / 'runs'}", "--set", f"model.base={base}",
        "--set", f"data.path={repo / 'tests' / 'fixtures' / 'data' / sample}",
        "--set", "deepspeed.num_processes=1", "--set", "data.data_split=1,1,1",
        "--set", "sft.max_steps=2", "--set", "sft.batch_size=1",
        "--set", "rm.max_steps=2", "--set", "rm.batch_size=1",
        "--set", "ppo.max_steps=1", "--set", "ppo.batch_size=1", "--set", "ppo.max_answer_len=8",
        "--set", "ppo.eval_prompts=1", "--set", "ppo.regularizer.wpr.k1=16",
        # the actor (ZeRO-2) offloaded too, in one of them: ZeRO-2's own offload code
        *(["--set", "ppo.actor_offload=true"] if pipeline == "hh-rlhf" else []),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stages = tomllib.loads(manifest.read_text())["stages"]
    for name in stages:
        state = json.loads((tmp_path / "runs" / name / "state.json").read_text())
        assert state["status"] == "finished", (name, state)
    ppo = json.loads((tmp_path / "runs" / "ppo-wpr" / "config.json").read_text())["manifest"]
    assert ppo["ppo"]["critic_zero_stage"] == 3 and ppo["ppo"]["critic_offload"] is True
    assert ppo["ppo"]["actor_zero_stage"] == 2
    assert ppo["ppo"]["actor_offload"] is (pipeline == "hh-rlhf")
    assert (
        json.loads((tmp_path / "runs" / "ppo-wpr" / "state.json").read_text())["metrics"]["steps"]
        == 1.0
    )
    # each model is exported as a plain Hugging Face folder of the base's architecture
    exported = AutoConfig.from_pretrained(tmp_path / "runs" / "ppo-wpr" / "model")
    assert exported.model_type == ("gpt2" if model == "gpt2" else "llama")


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
