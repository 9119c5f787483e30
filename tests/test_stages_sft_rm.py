"""`wprctl sft` and `wprctl rm` as a user runs them: learning, exact resume after SIGKILL,
1 vs 2 processes, HF outputs that score the same with plain transformers, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_after_checkpoint, run_cli, signal_after_first_step

# A micro project: seconds per stage, enough to exercise every mechanism.
MICRO = [
    "--set", "model.tiny.hidden_size=32",
    "--set", "model.tiny.intermediate_size=64",
    "--set", "model.tiny.vocab_size=512",
    "--set", "data.demo.n_train=300",
    "--set", "data.demo.n_validation=40",
    "--set", "sft.batch_size=8",
    "--set", "rm.batch_size=8",
]  # fmt: skip


def _init(tmp_path: Path) -> Path:
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0, res.stderr
    return tmp_path / "wprctl.toml"


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _series(manifest: Path, key: str, stage: str = "sft") -> list[float]:
    """One logged metric of a stage, in step order."""
    return [
        r[key] for r in _metrics(manifest.parent / "runs" / stage / "metrics.jsonl") if key in r
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_sft_learns_and_rm_scores_match_plain_transformers(demo_project: Path) -> None:
    runs = demo_project / "runs"
    sft = _metrics(runs / "sft" / "metrics.jsonl")
    evals = [r["eval/loss"] for r in sft if "eval/loss" in r]
    assert evals[-1] < evals[0] - 1.0  # held-out loss well below the untrained model's
    state = json.loads((runs / "rm" / "state.json").read_text())
    assert state["status"] == "finished"
    # held-out demo pairs (400); the demo's full settings reach about 0.85
    assert state["metrics"]["eval/accuracy"] >= 0.8

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from wprctl.manifest import load_manifest
    from wprctl.models import load_reward_model
    from wprctl.scoring import sequence_scores

    folder = runs / "rm" / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ours = load_reward_model(folder, pad_token_id=tok.pad_token_id).eval()
    texts = [
        "POST\nSubreddit: r/cars\nmy dad took my car.\nTL;DR: my dad took my car</s>",
        "short</s>",
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = plain(**batch).logits[:, 0]
        got = sequence_scores(ours, batch["input_ids"], batch["attention_mask"])
        # One at a time (no padding) gives the same end scores: pooling reads the last real token.
        single = torch.stack([plain(**tok(t, return_tensors="pt")).logits[0, 0] for t in texts])
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(single, ref, atol=1e-5)
    assert load_manifest(demo_project / "wprctl.toml").rm.lr > 0


def test_finished_stage_needs_force_or_resume(demo_project: Path) -> None:
    res = run_cli("sft", "-m", str(demo_project / "wprctl.toml"))
    assert res.returncode == 2 and "--force" in res.stderr
    res = run_cli("sft", "-m", str(demo_project / "wprctl.toml"), "--resume")
    assert res.returncode == 0 and "nothing to resume" in res.stdout


def test_sft_kill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    args = [
        *MICRO,
        "--set",
        "sft.max_steps=24",
        "--set",
        "sft.save_every=3",
        "--set",
        "sft.eval_every=100",
        "--set",
        "sft.log_every=1",
    ]
    straight = _init(tmp_path / "straight")
    res = run_cli("sft", "-m", str(straight), *args)
    assert res.returncode == 0, res.stderr[-2000:]

    killed = _init(tmp_path / "killed")
    latest = killed.parent / "runs" / "sft" / "checkpoints" / "latest"
    tag = kill_after_checkpoint(["sft", "-m", str(killed), *args], latest)
    assert not (killed.parent / "runs" / "sft" / "model").exists()
    status = run_cli("status", "-m", str(killed), "--json")
    assert json.loads(status.stdout)["stages"][0]["status"] == "interrupted"  # its pid is gone

    res = run_cli("sft", "-m", str(killed), *args)
    assert res.returncode == 2 and "--resume" in res.stderr  # a partial run is not silently redone
    res = run_cli("sft", "-m", str(killed), *args, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {tag[4:]}" in res.stdout

    a = _weights(straight.parent / "runs" / "sft" / "model")
    b = _weights(killed.parent / "runs" / "sft" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    la = _series(straight, "train/loss")
    lb = _series(killed, "train/loss")
    assert lb == pytest.approx(la, abs=1e-6)  # the log reads as one uninterrupted run
    tb_a, tb_b = _tb_series(straight, "train/loss"), _tb_series(killed, "train/loss")
    assert [step for step, _ in tb_b] == [step for step, _ in tb_a] == list(range(1, 25))
    assert [v for _, v in tb_b] == pytest.approx([v for _, v in tb_a], abs=1e-6)


def _tb_series(manifest: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar as TensorBoard shows it (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(manifest.parent / "runs" / "sft" / "tb"))
    acc.Reload()
    return sorted((e.step, e.value) for e in acc.Scalars(tag))


def test_a_live_run_is_not_touched_by_a_second_process_and_ctrl_c_checkpoints_and_exits_130(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import clean_env

    manifest = _init(tmp_path)
    # no periodic checkpoint: the only one is the one Ctrl-C asks for
    args = [*MICRO, "--set", "sft.epochs=10000", "--set", "sft.save_every=100000"]
    args += ["--set", "sft.log_every=1"]
    metrics = tmp_path / "runs" / "sft" / "metrics.jsonl"
    latest = tmp_path / "runs" / "sft" / "checkpoints" / "latest"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wprctl", "sft", "-m", str(manifest), *args],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 600
        while not (metrics.exists() and "train/" in metrics.read_text()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        status = json.loads(run_cli("status", "-m", str(manifest), "--json").stdout)
        assert status["stages"][0]["status"] == "running"
        for flag in ("--resume", "--force"):
            res = run_cli("sft", "-m", str(manifest), *args, flag, timeout=120)
            assert res.returncode == 2, res.stderr[-2000:]
            assert f"is running now (pid {proc.pid}" in res.stderr and "Traceback" not in res.stderr
            assert metrics.exists()  # --force did not delete the live run's folder
        assert proc.poll() is None and not latest.exists()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    said = re.search(r"sft: stopped on SIGINT after step (\d+), with a checkpoint; (.*)", err)
    assert said and "`wprctl sft --resume` continues" in said[2], err[-2000:]
    assert "error" not in err and "Traceback" not in err
    step = int(said[1])
    assert latest.read_text().strip() == f"step{step}"  # saved where it stopped
    assert _series(manifest, "step")[-1] == step  # and nothing logged after it
    state = json.loads((tmp_path / "runs" / "sft" / "state.json").read_text())
    assert state["status"] == "stopped" and f"after step {step}" in state["error"]
    status = json.loads(run_cli("status", "-m", str(manifest), "--json").stdout)
    assert status["stages"][0]["status"] == "stopped"

    def resume(max_steps: int) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "sft", "-m", str(manifest), *args, "--set", f"sft.max_steps={max_steps}", "--resume"
        )

    # a checkpoint past the run's length is not "finished" with a wrong step count
    res = resume(step - 1)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"checkpoint is at step {step}, past this run's {step - 1} steps" in res.stderr
    res = resume(step + 2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {step}" in res.stdout
    # changed settings are said, and each resume's changes kept on record
    assert (
        f"resuming sft with changed settings: sft.max_steps {step - 1} -> {step + 2}" in res.stdout
    )
    state = json.loads((tmp_path / "runs" / "sft" / "state.json").read_text())
    assert state["status"] == "finished" and "error" not in state  # the stop is over
    assert [r["changed"] for r in state["resumes"]] == [
        {"sft.max_steps": [None, step - 1]},
        {"sft.max_steps": [step - 1, step + 2]},
    ]
    # a variant's hint names the variant: the bare stage would resume another folder
    from wprctl.manifest import load_manifest
    from wprctl.runs import run_dir
    from wprctl.stages import resume_hint

    ppo_kl = run_dir(load_manifest(manifest), "ppo-kl", "ppo")
    assert "`wprctl ppo --variant ppo-kl --force` starts it again" in resume_hint(ppo_kl)
    ppo_kl.checkpoint_dir.mkdir(parents=True)
    (ppo_kl.checkpoint_dir / "latest").write_text("step2")
    assert "`wprctl ppo --variant ppo-kl --resume` continues" in resume_hint(ppo_kl)


def test_sigterm_stops_a_two_process_run_with_every_rank_checkpointed_at_one_step(
    tmp_path: Path,
) -> None:
    """SIGTERM to the command only (what `kill` or a scheduler sends; the ranks run in their own
    session, as after a Ctrl-C at the terminal): the ranks agree on a step, both save their
    ZeRO-2 shards there, and a two-process resume continues from it."""
    import signal

    import psutil

    manifest = _init(tmp_path)
    args = [*MICRO, "--set", "sft.batch_size=4", "--set", "deepspeed.zero_stage=2"]
    args += ["--set", "sft.save_every=100000", "--set", "sft.log_every=1", "--num-processes", "2"]
    metrics = tmp_path / "runs" / "sft" / "metrics.jsonl"
    res = signal_after_first_step(
        ["sft", "-m", str(manifest), *args, "--set", "sft.epochs=10000"], metrics, signal.SIGTERM
    )
    err = res.stderr
    assert res.returncode == 143, err[-3000:]
    said = re.findall(r"sft: stopped on SIGTERM after step (\d+), with a checkpoint", err)
    assert len(said) == 1, err[-3000:]  # said once, by the command, not once per rank
    step = int(said[0])
    assert "Traceback" not in err
    ckpt = tmp_path / "runs" / "sft" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step{step}"
    shards = sorted(p.name for p in (ckpt / "model" / f"step{step}").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    left = [
        p for p in psutil.process_iter(["cmdline"]) if str(manifest) in (p.info["cmdline"] or [])
    ]
    assert not left  # no rank outlives the command
    # a rank's message from an earlier run is never read as this run's
    stale = tmp_path / "runs" / "sft" / ".error.rank1"
    stale.write_text("sft: an earlier run's failure")
    res = run_cli("sft", "-m", str(manifest), *args, "--set", f"sft.max_steps={step + 2}",
                  "--resume")  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not stale.exists()
    assert res.stdout.count(f"resumed from step {step}") == 1  # rank 0 reports, not each rank
    assert "[INFO]" not in res.stdout + res.stderr  # nor DeepSpeed's launcher, line by line
    assert "Setting accelerator to CPU" not in res.stdout + res.stderr
    assert _series(manifest, "step")[-1] == step + 2


def test_a_rank_killed_by_the_system_is_named_with_its_signal(tmp_path: Path) -> None:
    """A rank SIGKILLed (what the out-of-memory killer does): the launcher's status 247 is told
    as the signal, with how to resume, and said once."""
    import signal

    from wprctl.stages import exit_status

    manifest = _init(tmp_path)
    args = ["sft", "-m", str(manifest), *MICRO, "--set", "sft.batch_size=4"]
    args += ["--set", "sft.epochs=10000", "--set", "sft.log_every=1", "--num-processes", "2"]
    metrics = tmp_path / "runs" / "sft" / "metrics.jsonl"
    res = signal_after_first_step(args, metrics, signal.SIGKILL, to_a_rank=True)
    flat = " ".join(res.stderr.split())
    assert res.returncode == 1, flat[-2000:]
    # DeepSpeed's launcher reports the first failed rank it polls: the killed one, or rank 0,
    # whose next collective failed; then the killed rank is the one that said nothing
    killed = "sft: a process was ended by SIGKILL (out of memory?" in flat
    assert killed or "rank 1 ended without a message" in flat, flat[-2000:]
    # no checkpoint was saved before the kill: resuming would only start over
    assert "no checkpoint yet: `wprctl sft --force` starts it again" in flat
    assert flat.count("error:") == 1
    state = json.loads((tmp_path / "runs" / "sft" / "state.json").read_text())
    assert state["status"] == "failed"
    # a plain exit code is not mistaken for a signal
    assert exit_status(1) == "exited with status 1" and exit_status(255).endswith("status 255")
    assert "SIGTERM" in exit_status(143) and "SIGSEGV" in exit_status(256 - 11)


def test_two_process_zero2_matches_one_process(tmp_path: Path) -> None:
    """Same global batch (8): one process with micro-batch 8 vs two with 4 each, under ZeRO-2.

    Tolerance 1e-4 on the logged mean loss: the two runs reduce in a different order (two
    per-rank token means averaged vs one mean over all tokens of the batch), float32 only.
    """
    common = [
        *MICRO,
        "--set",
        "deepspeed.zero_stage=2",
        "--set",
        "sft.max_steps=4",
        "--set",
        "sft.log_every=1",
        "--set",
        "sft.eval_every=100",
    ]
    one = _init(tmp_path / "one")
    res = run_cli("sft", "-m", str(one), *common, "--set", "sft.batch_size=8")
    assert res.returncode == 0, res.stderr[-2000:]
    two = _init(tmp_path / "two")
    res = run_cli(
        "sft", "-m", str(two), *common, "--set", "sft.batch_size=4", "--num-processes", "2"
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    la = _series(one, "train/loss")
    lb = _series(two, "train/loss")
    assert len(la) == len(lb) == 4
    # Per-rank token means differ from the global token mean when the two halves of a batch
    # have different response lengths, so compare the held-out loss (one reduction) tightly and
    # the training curve loosely.
    assert lb == pytest.approx(la, abs=0.05)
    ea = _series(one, "eval/loss")
    eb = _series(two, "eval/loss")
    assert eb[-1] == pytest.approx(ea[-1], abs=1e-3)


def test_rm_runs_of_one_manifest_train_the_same_model(tmp_path: Path) -> None:
    """The reward model's score head is new (random) weights: seeded like everything else, so
    running the stage again gives the same model bit for bit (it once gave a different head)."""
    manifest = _init(tmp_path)
    res = run_cli("sft", "-m", str(manifest), *MICRO, "--set", "sft.max_steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    rm_args = ["rm", "-m", str(manifest), *MICRO, "--set", "rm.max_steps=3"]
    runs = []
    for extra in ([], ["--force"]):
        res = run_cli(*rm_args, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(_weights(manifest.parent / "runs" / "rm" / "model"))
    a, b = runs
    assert a.keys() == b.keys() and any("score" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_force_with_bad_input_keeps_the_finished_run(tmp_path: Path) -> None:
    manifest = _init(tmp_path)
    args = [*MICRO, "--set", "sft.max_steps=2"]
    assert run_cli("sft", "-m", str(manifest), *args).returncode == 0
    model = tmp_path / "runs" / "sft" / "model" / "model.safetensors"
    before = model.read_bytes()
    bad = ["--set", f"model.tokenizer={tmp_path / 'no-such-tokenizer'}", "--force"]
    for extra in ([], ["--num-processes", "2"]):
        res = run_cli("sft", "-m", str(manifest), *args, *bad, *extra)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "no-such-tokenizer" in res.stderr and "previous run is kept" in res.stderr
        assert "--resume" not in res.stderr and "Traceback" not in res.stderr
        assert res.stderr.count("error:") == 1, res.stderr  # said once, not once per rank
        assert model.read_bytes() == before  # the finished run it was to replace is intact
        status = json.loads(run_cli("status", "-m", str(manifest), "--json").stdout)
        assert status["stages"][0]["status"] == "finished"
    res = run_cli("sft", "-m", str(manifest), *args, "--set", "sft.lr=1e-3", "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert model.read_bytes() != before and not (tmp_path / "runs" / ".replaced" / "sft").exists()


def test_rm_without_sft_output_is_exit_2(tmp_path: Path) -> None:
    manifest = _init(tmp_path)
    res = run_cli("rm", "-m", str(manifest), *MICRO)
    assert res.returncode == 2
    assert "stage 'sft' has no finished output" in res.stderr and "Traceback" not in res.stderr


def test_corrupt_checkpoint_on_resume_is_exit_2(tmp_path: Path) -> None:
    manifest = _init(tmp_path)
    args = [*MICRO, "--set", "sft.max_steps=24", "--set", "sft.save_every=2"]
    ckpt = tmp_path / "runs" / "sft" / "checkpoints"
    kill_after_checkpoint(["sft", "-m", str(manifest), *args], ckpt / "latest")
    for f in (ckpt / "model").rglob("*.pt"):
        f.write_bytes(b"garbage")
    res = run_cli("sft", "-m", str(manifest), *args, "--resume")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot load the checkpoint" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.stderr


def test_tokenizer_without_pad_is_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    manifest = _init(tmp_path / "p")
    res = run_cli(
        "sft", "-m", str(manifest), *MICRO, "--set", f"model.tokenizer={tmp_path / 'nopad'}"
    )
    assert res.returncode == 2
    assert "no pad token" in res.stderr and str(tmp_path / "nopad") in res.stderr


def test_the_program_leaves_its_process_group_on_clean_exits(tmp_path: Path) -> None:
    """Gloo's threads torn down by interpreter shutdown abort the process now and then (SIGABRT:
    a finished two-rank run died with -6 in CI), so the program destroys the process group a
    stage joined before it exits, when it finishes and when it exits 2 on bad input. A caller
    of ``main(argv)`` keeps its process and its group (DeepSpeed cannot join a second one)."""
    import subprocess
    import sys

    import torch.distributed as dist

    from tests.conftest import clean_env, wprctl_in_process

    manifest = _init(tmp_path)
    program = (
        "import sys\n"
        "from wprctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
        "import torch.distributed as dist\n"
        "print('group', dist.is_initialized())\n"
    )

    def run(*args: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-c", program, *args, "-m", str(manifest), *MICRO],
            env=clean_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.splitlines()[-2:]

    # rm joins the group, then finds no SFT output
    assert run("rm") == ["exit 2", "group False"]
    assert run("sft", "--set", "sft.max_steps=1")[-1] == "group False"
    assert (tmp_path / "runs" / "sft" / "model" / "model.safetensors").exists()
    assert (
        wprctl_in_process("rm", "-m", str(manifest), *MICRO, "--set", "rm.max_steps=1", "--force")
        == 0
    )
    assert dist.is_initialized()


def test_a_hub_id_base_model_is_read_from_the_offline_hub_cache(tmp_path: Path) -> None:
    """`model.base = "acme/tiny-chat"`, a hub id, resolves through the Hugging Face cache when the
    hub is unreachable (HF_HUB_OFFLINE, no network): SFT starts from the cached snapshot, not from
    a tiny model of its own. A hub id that is not cached is bad input naming the id."""
    import shutil

    from wprctl.manifest import TinyModelConfig
    from wprctl.models import build_tiny_model

    # a model whose shape differs from the demo manifest's tiny settings, so the output shows
    # which one SFT started from
    src = build_tiny_model(
        TinyModelConfig(hidden_size=48, intermediate_size=96, vocab_size=512, num_layers=1),
        seed=7,
        out_dir=tmp_path / "src",
    )
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    offline = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",  # any network attempt fails at once
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    manifest = _init(tmp_path / "project")
    common = ["-m", str(manifest), *MICRO, "--set", "sft.max_steps=1"]
    res = run_cli("sft", *common, "--set", "model.base=acme/tiny-chat", env=offline)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "project" / "runs"
    assert not (out / "base-tiny").exists()
    config = json.loads((out / "sft" / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (48, 1)
    assert _weights(out / "sft" / "model")["model.embed_tokens.weight"].shape == (
        json.loads((src / "config.json").read_text())["vocab_size"],
        48,
    )

    res = run_cli("sft", *common, "--set", "model.base=acme/not-cached", "--force", env=offline)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "acme/not-cached" in res.stderr and "Traceback" not in res.stderr
