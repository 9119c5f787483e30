"""Re-launching a stage under DeepSpeed's own launcher (`--num-processes N`).

The parent process re-executes the same `wprctl` command line through `deepspeed.launcher.runner`
with `--num_gpus N` (on a CPU machine DeepSpeed starts N CPU ranks with gloo; with GPUs, one rank
per GPU with NCCL) or a hostfile for several nodes, then exits with the launcher's status.
The children see WPRCTL_LAUNCHED=1 and run the stage.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from wprctl.console import err_console
from wprctl.errors import UserError

LAUNCHED_ENV = "WPRCTL_LAUNCHED"
# The command line `wprctl.cli.main` was called with, re-used for the launched ranks.
CURRENT_ARGV: list[str] | None = None


def under_launcher() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_command(
    num_processes: int,
    argv: list[str],
    *,
    hostfile: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        if not os.path.exists(hostfile):
            raise UserError(f"deepspeed.hostfile: {hostfile} does not exist")
        cmd += ["--hostfile", hostfile]
    cmd += [
        "--num_gpus",
        str(num_processes),
        "--master_port",
        str(master_port or _free_port()),
        "--no_local_rank",
        "--module",
        "wprctl",
        *argv,
    ]
    return cmd


def relaunch(
    num_processes: int,
    argv: list[str],
    *,
    hostfile: str | None = None,
    master_port: int | None = None,
) -> int:
    """Run `wprctl argv` with N ranks and return the launcher's exit status."""
    cmd = launcher_command(num_processes, argv, hostfile=hostfile, master_port=master_port)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    err_console.print(f"[dim]launching {num_processes} processes with DeepSpeed[/]")
    proc = subprocess.run(cmd, env=env, check=False)
    return proc.returncode
