"""The command line: every DESIGN.md command is registered with real help, and exit codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import run_cli
from wprctl.cli import app

COMMANDS = [
    "init",
    "status",
    "run",
    "quickstart",
    "sft",
    "rm",
    "ppo",
    "dar",
    "infer",
    "sample",
    "judge",
    "apps-eval",
    "report",
    "cost-graph",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # A real description, not just the usage line.
    assert len(result.output.split("Usage:")[1]) > 80


def test_the_command_list_gives_each_summary_as_one_paragraph() -> None:
    """`wprctl --help` at a width where every summary fits: one line per command, never the
    docstring's own line breaks."""
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"}).output
    panel = out[out.index("Commands") :]
    rows = [line for line in panel.splitlines()[1:] if line.strip("│╰─╯ ")]
    assert [row.split()[1] for row in rows] == [*COMMANDS, "data"]


def test_data_subcommands_have_help() -> None:
    for sub in ("show", "stats"):
        result = CliRunner().invoke(app, ["data", sub, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--json" in result.output


def test_manifest_options_are_common() -> None:
    for command in ("sft", "rm", "ppo", "dar", "status", "run"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--manifest" in out and "--set" in out, command
    for command in ("sft", "rm", "ppo", "dar"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--resume" in out and "--num-processes" in out and "--force" in out


def test_version_and_completion() -> None:
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("wprctl ")
    # the shell named, not detected: detection reads the parent processes, and a test run started
    # from a daemon or a detached job has no shell among them
    no_detection = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = run_cli("--show-completion", "bash", env=no_detection)
    assert res.returncode == 0 and re.search(r"^complete -.* wprctl$", res.stdout, re.M), res.stdout


def test_usage_error_is_exit_2(tmp_path: Path) -> None:
    res = run_cli("init", str(tmp_path), "--template", "nope")
    assert res.returncode == 2 and "demo" in res.stderr
    res = run_cli("sft", "--no-such-option")
    assert res.returncode == 2
    a_file = tmp_path / "posts.jsonl"
    a_file.write_text("{}\n")
    res = run_cli("init", str(a_file))  # a file where the project folder should be
    assert res.returncode == 2 and "not a folder" in res.stderr and "Traceback" not in res.stderr
    assert a_file.read_text() == "{}\n"


def test_init_then_status(tmp_path: Path) -> None:
    res = run_cli("init", str(tmp_path), "--template", "demo")
    assert res.returncode == 0, res.stderr
    res = run_cli("status", "-m", str(tmp_path / "wprctl.toml"), "--json")
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(res.stdout)
    assert {row["name"] for row in data["stages"]} >= {"sft", "rm"}
    assert all(row["status"] == "not started" for row in data["stages"])


@pytest.mark.parametrize("given", [None, "777"])
def test_cli_sets_libgomps_spin_count_before_torch_loads_and_keeps_a_users(given) -> None:
    """``GOMP_SPINCOUNT`` (see ``wprctl.cli.OPENMP_DEFAULTS``) is in the environment by the time a
    command imports PyTorch, whose libgomp reads it once at load; a user's own value wins."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from wprctl.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "import os; print(os.environ['GOMP_SPINCOUNT'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == (given or "20000")
