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


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_")) and "proxy" not in k.lower()
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), **extra)  # nothing cached
    return env


def _data_show_offline(tmp_path: Path, template: str, *sets: str) -> str:
    """`wprctl data show` on a new project of ``template`` with the hub unreachable: port 9
    (discard) on this machine, where nothing listens, so the connection is refused at once."""
    res = run_cli("init", str(tmp_path / template), "--template", template)
    assert res.returncode == 0, res.stderr
    manifest = str(tmp_path / template / "wprctl.toml")
    res = run_cli("data", "show", "-m", manifest, *sets, env=_env(tmp_path, "http://127.0.0.1:9"))
    assert res.returncode == 2, res.stderr
    assert "127.0.0.1 cannot be reached" in res.stderr
    assert "Retrying" not in res.stderr and "Traceback" not in res.stderr
    return res.stderr


def test_an_unreachable_hub_is_read_from_the_cache_only(tmp_path: Path) -> None:
    said = _data_show_offline(tmp_path, "demo", "--set", "model.base=nobody/no-model")
    assert "nobody/no-model: cannot load a tokenizer" in said
    # a dataset's hub id too (the tldr template's data.path)
    said = _data_show_offline(tmp_path, "tldr", "--set", "model.base=tiny")
    assert "data.path: cannot load 'openai/summarize_from_feedback'" in said
    assert "Offline? Point data.path at a local copy" in said


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


def test_behind_a_proxy_the_proxy_is_what_must_answer(tmp_path: Path) -> None:
    """Where only a proxy reaches the network, the hub's own host never answers directly."""
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        env = _env(
            tmp_path, "https://hub.invalid", HTTPS_PROXY=f"127.0.0.1:{proxy.getsockname()[1]}"
        )
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True
        )
    assert probe.stdout.split() == ["False", "None"], probe.stderr
    # ... unless NO_PROXY exempts the host: then the host itself must answer, and does not
    env["NO_PROXY"] = "hub.invalid"
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["True", "1"], probe.stderr
