"""`wprctl ppo` as a user runs it: the demo's PPO variants raise the held-out reward over SFT,
exact resume after SIGKILL, two processes, and APPS mode with the executor's reward."""

from __future__ import annotations

import json
import re
from pathlib import Path
from signal import SIGINT

import pytest

from tests.conftest import kill_after_checkpoint, run_cli, signal_after_first_step
from wprctl.codeexec.problems import BUILTIN_SAMPLES_PATH

PPO_SHORT = [
    "--set",
    "ppo.max_steps=8",
    "--set",
    "ppo.eval_prompts=48",
    "--set",
    "ppo.save_every=1000",
]


def _state(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "state.json").read_text())


@pytest.mark.parametrize("variant", ["ppo-kl", "ppo-wpr"])
def test_ppo_raises_heldout_reward_over_sft(demo_project: Path, variant: str) -> None:
    res = run_cli("ppo", "-m", str(demo_project / "wprctl.toml"), "--variant", variant, *PPO_SHORT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = _state(demo_project, variant)["metrics"]
    assert metrics["eval/reward"] > metrics["eval/reward_start"]
    rows = [
        json.loads(x)
        for x in (demo_project / "runs" / variant / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 8
    for key in ("train/kl_ref", "train/penalty", "train/entropy", "train/policy_clipfrac", "train/value_clipfrac",
                "train/time/generation", "train/time/regularizer", "train/time/training", "train/length"):  # fmt: skip
        assert key in train[-1], key
    if variant == "ppo-wpr":
        assert "train/reg/converged_fraction" in train[-1]
        assert train[-1]["train/penalty"] != 0.0
    # The exported actor is a plain HF folder.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(demo_project / "runs" / variant / "model")


def _explicit_models(demo_project: Path, out: Path) -> list[str]:
    runs = demo_project / "runs"
    return [
        "--set", f"project.output_dir={out}",
        "--set", f"ppo.actor={runs / 'sft' / 'model'}",
        "--set", f"ppo.critic={runs / 'rm' / 'model'}",
        "--set", f"ppo.reward_model={runs / 'rm' / 'model'}",
        "--set", "ppo.eval_prompts=8",
        "--set", "ppo.batch_size=8",
    ]  # fmt: skip


def test_ppo_kill_and_resume_equals_uninterrupted(demo_project: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    manifest = str(demo_project / "wprctl.toml")
    steps = ["--set", "ppo.max_steps=6", "--set", "ppo.save_every=2", "--set", "ppo.regularizer.kind=kl",
             "--set", "ppo.regularizer.adaptive=true"]  # fmt: skip
    straight = _explicit_models(demo_project, tmp_path / "straight")
    res = run_cli("ppo", "-m", manifest, *straight, *steps)
    assert res.returncode == 0, res.stderr[-3000:]

    killed = _explicit_models(demo_project, tmp_path / "killed")
    latest = tmp_path / "killed" / "ppo" / "checkpoints" / "latest"
    tag = kill_after_checkpoint(["ppo", "-m", manifest, *killed, *steps], latest)
    res = run_cli("ppo", "-m", manifest, *killed, *steps, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {tag[4:]}" in res.stdout
    a = load_file(tmp_path / "straight" / "ppo" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "ppo" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # The adaptive beta was restored too: the last logged values agree.
    last = [
        json.loads(x)
        for x in (tmp_path / "straight" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    again = [
        json.loads(x)
        for x in (tmp_path / "killed" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    beta_a = [r["train/beta"] for r in last if "train/beta" in r]
    beta_b = [r["train/beta"] for r in again if "train/beta" in r]
    assert beta_b == pytest.approx(beta_a, rel=1e-9) and beta_a[0] != beta_a[-1]

    # Ctrl-C checkpoints where it stops (no periodic checkpoint here), exactly resumable too
    stopped = _explicit_models(demo_project, tmp_path / "stopped")
    args = ["ppo", "-m", manifest, *stopped, *steps, "--set", "ppo.save_every=100"]
    args += ["--set", "ppo.log_every=1"]
    res = signal_after_first_step(args, tmp_path / "stopped" / "ppo" / "metrics.jsonl", SIGINT)
    assert res.returncode == 130, res.stderr[-3000:]
    step = int(re.search(r"ppo: stopped on SIGINT after step (\d+)", res.stderr)[1])
    assert 0 < step < 6
    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {step}" in res.stdout
    c = load_file(tmp_path / "stopped" / "ppo" / "model" / "model.safetensors")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) <= 1e-6


def test_ppo_two_processes(demo_project: Path, tmp_path: Path) -> None:
    # The actor on ZeRO-3: the two ranks sample answers of different lengths, so generation must
    # not run ZeRO-3's communicating hooks (it crashed with a gloo collective mismatch).
    res = run_cli(
        "ppo", "-m", str(demo_project / "wprctl.toml"), *_explicit_models(demo_project, tmp_path),
        "--set", "ppo.max_steps=2", "--set", "ppo.batch_size=4", "--set", "ppo.regularizer.kind=wpr",
        "--set", "ppo.actor_zero_stage=3", "--set", "ppo.critic_zero_stage=3", "--num-processes", "2",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = json.loads((tmp_path / "ppo" / "state.json").read_text())
    assert state["status"] == "finished" and state["metrics"]["steps"] == 2.0
    # batch sizes are per process, so the run records how many processes it had
    assert json.loads((tmp_path / "ppo" / "config.json").read_text())["world_size"] == 2


def test_too_few_prompts_is_a_usage_error(demo_project: Path, tmp_path: Path) -> None:
    res = run_cli(
        "ppo", "-m", str(demo_project / "wprctl.toml"), *_explicit_models(demo_project, tmp_path),
        "--set", "ppo.batch_size=100000", "--set", "ppo.generation_batches=2",
    )  # fmt: skip
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, err[-2000:]
    assert "ppo.batch_size 100000 x 2" in err and "Traceback" not in err


def test_ppo_apps_mode_uses_execution_rewards(tmp_path: Path, tiny_model_dir: Path) -> None:
    res = run_cli("init", str(tmp_path), "--template", "apps")
    assert res.returncode == 0
    res = run_cli(
        "ppo", "-m", str(tmp_path / "wprctl.toml"),
        "--set", "model.base=tiny", "--set", f"data.path={BUILTIN_SAMPLES_PATH}",
        "--set", "deepspeed.num_processes=1", "--set", "deepspeed.zero_stage=0",
        "--set", f"ppo.actor={tiny_model_dir}", "--set", f"ppo.critic={tiny_model_dir}",
        "--set", "ppo.max_steps=1", "--set", "ppo.batch_size=4", "--set", "ppo.eval_prompts=4",
        "--set", "ppo.max_answer_len=16", "--set", "ppo.max_prompt_len=256", "--set", "data.max_prompt_len=256",
        "--set", "ppo.actor_zero_stage=0", "--set", "ppo.critic_zero_stage=0", "--set", "ppo.critic_offload=false",
        "--set", "ppo.regularizer.kind=kl", "--set", "apps.timeout=2",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if "train/reward" in r]
    # An untrained tiny model solves nothing: each sample scores -1.0 (compile error), -0.6
    # (runtime error) or -0.3 (ran, passed no test), so the mean lies in [-1, -0.3].
    assert train and -1.0 <= train[0]["train/reward"] <= -0.3
