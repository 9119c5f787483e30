"""Shared pytest fixtures. Area-specific fixtures live in the test modules; add shared ones here
(with a targeted edit: several people work on this file)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each xdist worker, and every process it starts, gets its share of the cores (a value in the
# environment is kept). PyTorch's default, one OpenMP thread per core in every process, would run
# twice as many busy threads as cores: two demo SFT runs side by side took 74 s so, 26 s with one
# thread each. (Run before the worker imports torch: conftest is read when its config is made.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from wprctl.launch import rank_threads  # the ranks' share of the cores, the same split

    os.environ.setdefault("OMP_NUM_THREADS", str(rank_threads(_WORKERS)))


# The suite runs on two pytest-xdist workers (`-n 2` in pyproject's addopts): much of its time is
# subprocess start-up, imports and waiting on a child, which leaves a core idle. Work is handed
# out a whole file at a time, so a file's module and session fixtures are built once, and the
# files that share `demo_project` (SFT and RM trained once, a minute) go together. Files are
# handed out in the order below, the longest first, so that no long one starts last. On two
# cores the demo_project group is about half of the suite, so one worker runs little else.
_SHARED_FIXTURE_GROUPS = {
    "test_stages_sft_rm.py": "demo_project",
    "test_stages_ppo.py": "demo_project",
}
_LONGEST_FIRST = [  # measured: 720, 290, 250, 65 and 65 s; the OT solvers' first compile ~50 s
    "demo_project",
    "test_pipeline.py",
    "test_engine.py",
    "test_dar_stage.py",
    "test_ot_cli.py",
    "test_ot_golden.py",
]


def _group(path: str) -> str:
    name = Path(path.split("::", 1)[0]).name
    return _SHARED_FIXTURE_GROUPS.get(name, name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable sort


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    # xdist's own `loadgroup` marks tests by rewriting their node ids, which pytest >= 9.2 no
    # longer allows; a scheduler that groups by file name needs neither.
    from xdist.scheduler import LoadScopeScheduling

    class ByFileGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByFileGroup(config, log)


# Set by any test that starts a process group in-process (DAR's stage tests do); a child that
# inherited them would try to join that group's port instead of making its own.
DIST_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def _gloo_rank(rank: int, work: Callable[[int], None], port: int, world: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank)
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(work: Callable[[int], None], world: int = 2) -> None:
    """``work(rank)`` in ``world`` spawned processes joined in one gloo group (``work``: a
    module-level function, or a ``functools.partial`` of one, so that it pickles)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_gloo_rank, args=(work, port, world), nprocs=world, join=True)


def wprctl_in_process(*args: str) -> int:
    """`wprctl ARGS` in this process (no interpreter start-up); returns the exit status."""
    from wprctl.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def wprctl_captured(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`wprctl ARGS` in this process; the exit status and stdout + stderr."""
    code = wprctl_in_process(*args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def judge_server():
    """A local OpenAI-compatible server on 127.0.0.1 (wprctl's own, with scripted replies)."""
    from wprctl.judge.server import JudgeServer

    srv = JudgeServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model (seeded random head on the tiny backbone) saved as a plain HF folder."""
    import torch

    from wprctl.models import load_reward_model, load_tokenizer

    out = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(0)
    load_reward_model(tiny_model_dir, pad_token_id=0).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def clean_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment for a `wprctl` child process: ours, without process-group variables, with
    ``extra`` (None: removed)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["COLUMNS"] = "200"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str | None] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run `wprctl ARGS` as a user would, in a subprocess; returns the completed process."""
    full_env = clean_env(env)
    return subprocess.run(
        [sys.executable, "-m", "wprctl", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kill_after_checkpoint(args: list[str], latest: Path, timeout: float = 600) -> str:
    """Start `wprctl ARGS`, SIGKILL it as soon as `latest` (a checkpoint's tag file) appears,
    and return that tag. The run must still be going then, or the test would prove nothing."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "wprctl", *args],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and not latest.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), f"no checkpoint after {timeout} s"
    return latest.read_text().strip()


def signal_after_first_step(
    args: list[str], metrics: Path, signum: int, timeout: float = 600, to_a_rank: bool = False
) -> subprocess.CompletedProcess[str]:
    """Start `wprctl ARGS`, send it ``signum`` once `metrics` (a metrics.jsonl) has a training
    row, and return how it ended. ``to_a_rank``: send it to the last rank of a `--num-processes`
    run instead (wprctl -> DeepSpeed's runner -> its launcher -> the ranks)."""
    import time

    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "wprctl", *args],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + timeout
        while not (metrics.exists() and "train/" in metrics.read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        if to_a_rank:
            (runner,) = psutil.Process(proc.pid).children()
            ranks = [r for p in runner.children() for r in p.children()]
            ranks[-1].send_signal(signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The project's tiny byte-level BPE (pad/eos/bos), trained on a small demo corpus."""
    from wprctl.data import demo_tokenizer_corpus
    from wprctl.models import build_tiny_tokenizer

    return build_tiny_tokenizer(demo_tokenizer_corpus(seed=0, n_posts=500), vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tiny-Llama HF folder (model + tokenizer) built the way `model.base = "tiny"` does."""
    from wprctl.manifest import TinyModelConfig
    from wprctl.models import build_tiny_model

    cfg = TinyModelConfig(
        vocab_size=512,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return build_tiny_model(cfg, seed=0, out_dir=tmp_path_factory.mktemp("tiny") / "model")


# The demo project that several stage tests share: SFT and RM trained once with the demo's own
# model and learning rates (what `wprctl quickstart` runs) on a quarter of its data (written into
# the manifest, so PPO runs in this project read the same rows) and one epoch each, so tests
# check the behaviour users see in about a minute.
DEMO_STAGE_SETS: list[str] = ["--set", "sft.epochs=1", "--set", "rm.epochs=1"]


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    res = run_cli("init", str(root), "--template", "demo")
    assert res.returncode == 0, res.stderr
    manifest = root / "wprctl.toml"
    text = manifest.read_text()
    assert "\nn_train = 40000\n" in text
    manifest.write_text(text.replace("\nn_train = 40000\n", "\nn_train = 10000\n"))
    for stage in ("sft", "rm"):
        res = run_cli(stage, "-m", str(manifest), *DEMO_STAGE_SETS)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root
