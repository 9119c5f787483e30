"""The engine layer on real DeepSpeed engines: ZeRO 0/2/3, 2 processes under the launcher, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wprctl.launch import launcher_command

WORKER = ["-m", "tests.workers.engine_steps"]
REPO = Path(__file__).resolve().parents[1]
# Same global batch, different reduction order (per-rank means averaged vs one mean, gloo sums):
# float32 rounding only. Measured differences are ~1e-6; 1e-4 leaves room across machines.
MULTIPROC_TOL = 1e-4


def _run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, *WORKER, *args]
    else:
        cmd = launcher_command(nproc, [*args])
        # The launcher runs modules with --module; point it at the worker module instead of wprctl.
        cmd[cmd.index("wprctl")] = "tests.workers.engine_steps"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def _losses(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_one_step_each_zero_stage_trains(tiny_model_dir: Path, tmp_path: Path, zero: int) -> None:
    out = tmp_path / "out.json"
    _run(["--model", str(tiny_model_dir), "--zero", str(zero), "--steps", "3", "--out", str(out)])
    res = _losses(out)
    assert len(res["losses"]) == 3
    # Training on the probe batch (step 0's batch) lowers its loss.
    assert res["probe"] < res["losses"][0]
    # The export is a plain HF folder with full (gathered) weights, even under ZeRO-3.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out.with_suffix(".model"))
    assert all(p.numel() > 0 for p in model.parameters())


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_match_one(tiny_model_dir: Path, tmp_path: Path, zero: int) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    before = _shm_buffers()
    _run(["--model", str(tiny_model_dir), "--zero", str(zero), "--steps", "4", "--out", str(one)])
    _run(
        ["--model", str(tiny_model_dir), "--zero", str(zero), "--steps", "4", "--out", str(two)],
        nproc=2,
    )
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM each) do not outlive the runs.
    assert _shm_buffers() <= before
    a, b = _losses(one), _losses(two)
    assert b["world"] == 2
    assert a["losses"] == pytest.approx(b["losses"], abs=MULTIPROC_TOL)
    assert a["probe"] == pytest.approx(b["probe"], abs=MULTIPROC_TOL)


def test_save_load_continue_equals_never_stopping(tiny_model_dir: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight.json", tmp_path / "resumed.json"
    ckpt = tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--zero", "2", "--steps", "5"]
    _run([*args, "--out", str(straight)])
    _run([*args, "--ckpt", str(ckpt), "--save-at", "3", "--out", str(tmp_path / "first.json")])
    _run([*args, "--ckpt", str(ckpt), "--resume", "--out", str(resumed)])
    a, b = _losses(straight), _losses(resumed)
    assert b["losses"] == pytest.approx(a["losses"][3:], abs=1e-6)
    assert b["probe"] == pytest.approx(a["probe"], abs=1e-6)
    from safetensors.torch import load_file

    wa = load_file(straight.with_suffix(".model") / "model.safetensors")
    wb = load_file(resumed.with_suffix(".model") / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_offload_trains_like_no_offload(tiny_model_dir: Path, tmp_path: Path) -> None:
    """ZeRO-Offload of the optimizer and the parameters (ZeRO-3) is the same AdamW: the losses
    match the run without offload, with DeepSpeed's CPU Adam and, where its op cannot be built,
    with PyTorch's (said once); and a resumed offloaded run continues exactly. (ZeRO-2 with offload
    runs in the hh-rlhf pipeline's test.)"""
    args = ["--model", str(tiny_model_dir), "--zero", "3", "--steps", "4"]
    _run([*args, "--out", str(tmp_path / "plain.json")])
    plain = _losses(tmp_path / "plain.json")
    assert plain["probe"] < plain["losses"][0]  # it trains
    fallback = "the offloaded optimizer runs PyTorch's AdamW"
    for how in ["cpu_adam", "no cpu_adam"]:
        out = tmp_path / f"{how}.json"
        flag = ["--no-cpu-adam"] if how == "no cpu_adam" else []
        said = " ".join(_run([*args, "--offload", *flag, "--out", str(out)]).stderr.split())
        assert said.count(fallback) == (how == "no cpu_adam"), said[-2000:]
        assert _losses(out)["losses"] == pytest.approx(plain["losses"], abs=MULTIPROC_TOL)
        assert _losses(out)["probe"] == pytest.approx(plain["probe"], abs=MULTIPROC_TOL)
    offloaded = _losses(tmp_path / "cpu_adam.json")
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.json"
    _run([*args, "--offload", "--ckpt", str(ckpt), "--save-at", "2", "--out", str(out)])
    _run([*args, "--offload", "--ckpt", str(ckpt), "--resume", "--out", str(out)])
    assert _losses(out)["losses"] == pytest.approx(offloaded["losses"][2:], abs=1e-6)
    assert _losses(out)["probe"] == pytest.approx(offloaded["probe"], abs=1e-6)


def test_deepspeed_is_told_cpu_only_where_it_has_no_accelerator_to_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CUDA here: "cpu" (silences DeepSpeed's guess). With a package that gives DeepSpeed an
    accelerator of another kind (here an Ascend NPU's torch_npu), wprctl leaves it to detect."""
    import torch

    from wprctl.console import _default_ds_accelerator

    if torch.cuda.is_available():
        assert _default_ds_accelerator() == ""
        return
    assert _default_ds_accelerator() == "cpu"
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _default_ds_accelerator() == ""
