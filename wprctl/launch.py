"""Re-launching a stage under DeepSpeed's own launcher (`--num-processes N`).

The parent process re-executes the same `wprctl` command line through `deepspeed.launcher.runner`
with `--num_gpus N` (on a CPU machine DeepSpeed starts N CPU ranks with gloo; with GPUs, one rank
per GPU with NCCL) or a hostfile for several nodes, then exits with the launcher's status.
The children see WPRCTL_LAUNCHED=1 and run the stage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from types import FrameType

from wprctl.console import err_console, quiet_library_warnings
from wprctl.errors import UserError
from wprctl.stopping import restore_signals, take_signals

LAUNCHED_ENV = "WPRCTL_LAUNCHED"
# The command line `wprctl.cli.main` was called with, re-used for the launched ranks.
CURRENT_ARGV: list[str] | None = None


def under_launcher() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_threads(num_processes: int) -> int:
    """Intra-op threads for each of ``num_processes`` ranks on this machine: its cores shared out.

    PyTorch starts one OpenMP thread per core in every process, so N ranks on one machine would
    run N times as many busy threads as there are cores, and each of the ranks' many small
    parallel ops would wait at its barrier for a thread that another rank displaced: a demo SFT
    run with two ranks on two cores took 38 s so, and 29 s with one thread each (one rank alone:
    34 s). torchrun makes the same choice (one thread per rank unless OMP_NUM_THREADS is set);
    DeepSpeed's launcher only with ``--bind_cores_to_rank``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // num_processes)


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
        # its log (each rank's command line when spawned, and again as an ERROR when one exits
        # non-zero) drowns the run's own messages, and wprctl reports a failed rank itself
        "--log_level",
        "critical",
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
) -> tuple[int, int]:
    """Run `wprctl argv` with N ranks; returns the launcher's exit status and the stop signal
    (``wprctl.stopping.STOP_SIGNALS``) this process passed on to the ranks, or 0.

    The launcher runs in a session of its own, so a Ctrl-C at the terminal reaches this process
    alone, which hands it to the ranks: they stop at the same step with a checkpoint
    (`wprctl.stopping`). Reaching the launcher's own processes instead, a Ctrl-C would make
    DeepSpeed's runner exit at once with a traceback while the ranks were still saving.
    """
    cmd = launcher_command(num_processes, argv, hostfile=hostfile, master_port=master_port)
    # its choice of DS_ACCELERATOR must reach DeepSpeed's runner and launcher too, or each of
    # them warns on import that it found no GPU
    quiet_library_warnings()
    env = {**os.environ, LAUNCHED_ENV: "1"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    threads = ""
    if hostfile is None and "OMP_NUM_THREADS" not in env:
        n = rank_threads(num_processes)
        env["OMP_NUM_THREADS"] = str(n)
        threads = f", {n} CPU thread{'s' if n > 1 else ''} each (OMP_NUM_THREADS overrides)"
    err_console.print(f"[dim]launching {num_processes} processes with DeepSpeed{threads}[/]")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        # the ranks' own session gets no terminal signal (Ctrl-C, a closed terminal) but this
        nonlocal received
        received = received or signum
        _signal_ranks(proc.pid, signum, remote=hostfile is not None)

    previous = take_signals(forward)
    try:
        code = proc.wait()
    finally:
        restore_signals(previous)
    return code, received


def _signal_ranks(runner_pid: int, signum: int, *, remote: bool) -> None:
    """Pass a stop signal to the ranks: runner -> per-node launcher -> ranks, on this host.

    With a hostfile the ranks are on other hosts, and DeepSpeed's runner has its own handler
    that stops them there; before the ranks exist, the whole launcher is ended.
    """
    import psutil

    try:
        if remote:  # DeepSpeed's runner stops the remote ranks on SIGINT and SIGTERM
            os.kill(runner_pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
            return
        ranks = [r for p in psutil.Process(runner_pid).children() for r in p.children()]
        for r in ranks:
            r.send_signal(signum)
        if not ranks:
            os.killpg(runner_pid, signal.SIGTERM)
    except (psutil.Error, ProcessLookupError):
        pass  # it ended meanwhile
