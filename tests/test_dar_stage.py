"""`wprctl dar` end to end on the demo task with the tiny model: it raises the held-out reward over
the SFT policy it starts from, logs the metrics `wprctl report` plots, and a run killed after a
checkpoint and resumed ends with the uninterrupted run's weights and metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import clean_env, wprctl_in_process

# One thread per process: the machine's cores are shared, and oversubscribed BLAS threads make
# the tiny model several times slower. Same thread count in and out of process: same float sums.
ENV = {"OMP_NUM_THREADS": "1"}
DATA = ["--set", "data.demo.n_train=1000", "--set", "data.demo.n_validation=40"]
DAR = [
    *DATA,
    "--set", "dar.lr=5e-4",  # the demo's 1e-4 needs more than 20 iterations to show
    "--set", "dar.batch_size=8",
    "--set", "dar.iterations=20",
    "--set", "dar.eval_prompts=32",
    "--set", "dar.eval_every=10",
    "--set", "dar.save_every=5",
]  # fmt: skip
TRAIN_KEYS = (
    "train/reward", "train/kl_ref", "train/weight_mean", "train/weight_max", "train/clip_fraction",
    "train/ess", "train/length", "train/no_eos_fraction", "train/gold", "train/loss",
)  # fmt: skip
EVAL_KEYS = ("eval/reward", "eval/gold", "eval/kl_ref", "eval/length", "eval/no_eos_fraction")


wprctl = wprctl_in_process


def _child_env() -> dict[str, str]:
    # An in-process stage leaves its one-rank process group's variables in os.environ.
    return clean_env(ENV)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dar_project(tmp_path_factory: pytest.TempPathFactory, _one_thread) -> Path:
    """The demo template with SFT and RM trained briefly on a small slice of the demo data."""
    root = tmp_path_factory.mktemp("dar")
    manifest = str(root / "wprctl.toml")
    assert wprctl("init", str(root), "--template", "demo") == 0
    assert wprctl("sft", "-m", manifest, *DATA, "--set", "sft.epochs=6") == 0
    assert wprctl("rm", "-m", manifest, *DATA, "--set", "rm.epochs=2") == 0
    return root


@pytest.fixture(scope="session")
def dar_run(dar_project: Path) -> Path:
    """An uninterrupted `wprctl dar` run (the paper's alpha, beta, w_clip; the demo's [dar])."""
    assert wprctl("dar", "-m", str(dar_project / "wprctl.toml"), *DAR) == 0
    return dar_project / "runs" / "dar"


def test_dar_raises_the_held_out_reward_over_sft(dar_run: Path) -> None:
    rows = _metrics(dar_run / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward" in r]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in EVAL_KEYS:
        assert all(key in r for r in evals), key
    for key in TRAIN_KEYS:
        assert all(key in r for r in train), key
    start, end = evals[0], evals[-1]
    # Step 0 is the SFT policy itself: no divergence from pi_0 yet.
    assert start["eval/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    # The reward model's held-out score. Measured: 0.48 -> 0.83 here (project seed 42); with
    # seeds 1 and 2 (same settings, CLI) -0.52 -> 0.37 and 0.45 -> 0.67. The gold oracle rose in
    # all three (by 0.29, 0.05, 0.29), too little to assert on in 20 iterations.
    assert end["eval/reward"] > start["eval/reward"] + 0.1
    assert end["eval/kl_ref"] > 0.1  # it moved away from pi_0 to get there
    # Weights: the paper's w_clip = 20 caps them; the ESS is a fraction of the batch.
    for r in train:
        assert 0 < r["train/weight_mean"] <= r["train/weight_max"] <= 20.0
        assert 0 <= r["train/clip_fraction"] <= 1
        assert 1 / 32 <= r["train/ess"] <= 1  # 8 prompts x 4 answers
    assert train[0]["train/kl_ref"] == pytest.approx(0.0, abs=1e-4)  # pi_t = pi_0 at iteration 1

    state = json.loads((dar_run / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["metrics"]["eval/reward"] == pytest.approx(end["eval/reward"])
    lineage = json.loads((dar_run.parent / "lineage.json").read_text())
    assert lineage["dar"]["outputs"]["model"] == "dar/model"  # relative: the project can move
    from transformers import AutoModelForCausalLM

    sft = _weights(dar_run.parent / "sft" / "model")
    dar = AutoModelForCausalLM.from_pretrained(dar_run / "model").state_dict()
    moved = [k for k in sft if not torch.equal(sft[k], dar[k])]
    assert moved  # the exported folder holds the trained policy, loadable by transformers alone


def test_killed_run_resumes_to_the_uninterrupted_weights(dar_project: Path, dar_run: Path) -> None:
    runs = dar_project / "runs"
    args = [
        "-m", str(dar_project / "wprctl.toml"), *DAR,
        "--set", "project.output_dir=runs-resume",
        # Same SFT and RM models as the uninterrupted run, named by path from the other folder.
        "--set", f"dar.actor={runs / 'sft' / 'model'}",
        "--set", f"dar.reward_model={runs / 'rm' / 'model'}",
    ]  # fmt: skip
    out = dar_project / "runs-resume" / "dar"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wprctl", "dar", *args],
        env=_child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    assert json.loads((out / "state.json").read_text())["status"] == "running"

    res = subprocess.run(
        [sys.executable, "-m", "wprctl", "dar", *args, "--resume"],
        env=_child_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _weights(dar_run / "model"), _weights(out / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # The resumed metrics read as one run: every iteration once, with the same values.
    ours = [r for r in _metrics(out / "metrics.jsonl") if "train/reward" in r]
    theirs = [r for r in _metrics(dar_run / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in ours] == list(range(1, 21))
    for x, y in zip(ours, theirs, strict=True):
        assert x["train/reward"] == pytest.approx(y["train/reward"], abs=1e-5)
        assert x["train/ess"] == pytest.approx(y["train/ess"], abs=1e-5)


def test_too_few_prompts_is_a_usage_error(dar_project: Path, capsys) -> None:
    code = wprctl(
        "dar", "-m", str(dar_project / "wprctl.toml"), *DATA,
        "--set", "project.output_dir=runs-bad", "--set", "dar.batch_size=5000",
        "--set", f"dar.actor={dar_project / 'runs' / 'sft' / 'model'}",
    )  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err[-2000:]
    assert "dar.batch_size 5000" in err and "Traceback" not in err
