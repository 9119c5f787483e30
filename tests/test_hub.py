"""Hub ids on a machine without network: offline mode at once, not a minute of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli

PROBE = (
    "import os; from wprctl.hub import offline_unless_reachable; "
    "print(offline_unless_reachable(), os.environ.get('HF_HUB_OFFLINE'))"
)


def _env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))  # nothing cached
    return env


def test_an_unreachable_hub_is_read_from_the_cache_only(tmp_path: Path) -> None:
    # port 9 (discard) on this machine: nothing listens, the connection is refused at once
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0, res.stderr
    res = run_cli(
        "data", "show", "-m", str(tmp_path / "wprctl.toml"), "--set", "model.base=nobody/no-model",
        env=_env(tmp_path, "http://127.0.0.1:9"),
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "127.0.0.1 cannot be reached" in res.stderr
    assert "nobody/no-model: cannot load a tokenizer" in res.stderr
    assert "Retrying" not in res.stderr and "Traceback" not in res.stderr
    # a dataset's hub id too (the tldr template's data.path)
    res = run_cli("init", str(tmp_path / "tldr"), "--template", "tldr")
    assert res.returncode == 0, res.stderr
    res = run_cli(
        "data", "show", "-m", str(tmp_path / "tldr" / "wprctl.toml"), "--set", "model.base=tiny",
        env=_env(tmp_path, "http://127.0.0.1:9"),
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "data.path: cannot load 'openai/summarize_from_feedback'" in res.stderr
    assert "Offline? Point data.path at a local copy" in res.stderr
    assert "Retrying" not in res.stderr and "Traceback" not in res.stderr


def test_a_reachable_hub_is_left_online(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        probe = [sys.executable, "-c", PROBE]
        online = subprocess.run(probe, env=_env(tmp_path, endpoint), capture_output=True, text=True)
    assert online.stdout.split() == ["False", "None"], online.stderr
    gone = subprocess.run(
        probe, env=_env(tmp_path, endpoint), capture_output=True, text=True
    )  # the server is closed now
    assert gone.stdout.split() == ["True", "1"], gone.stderr
