"""Starting, feeding and killing sandboxes (the evaluator's side of `runner.py`).

A sandbox is one supervisor process (`runner.py`) started through `unshare(1)` in fresh network,
mount, PID, IPC and UTS namespaces, with a scrubbed environment and its own session. It lives for
many samples; every test of every program runs in a child it forks (see runner.py for why that is
safe). Where the OS refuses a namespace we fall back, with one logged warning, to what it allows:
rlimits, a dropped uid and session kills are always applied.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wprctl.codeexec.config import ExecConfig
from wprctl.codeexec.runner import recv_frame, send_json
from wprctl.errors import RunError

log = logging.getLogger("wprctl.codeexec")

RUNNER = Path(__file__).with_name("runner.py")

# Namespaces we ask for, with the unshare(1) flags that create them.
NAMESPACES: dict[str, tuple[str, ...]] = {
    "net": ("--net",),
    "mount": ("--mount",),
    "pid": ("--pid", "--fork", "--kill-child"),
    "ipc": ("--ipc",),
    "uts": ("--uts",),
}

# Programs run as uid BASE + slot (root only): distinct per concurrent sandbox so RLIMIT_NPROC, which
# counts per uid, cannot let a fork bomb in one sandbox starve the programs of another.
UID_BASE = 1_700_000

SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Isolation:
    """What the OS granted: namespaces in use and whether programs lose root."""

    namespaces: tuple[str, ...]
    uid_drop: bool
    refused: tuple[str, ...] = ()

    def describe(self) -> str:
        ns = ",".join(self.namespaces) or "none"
        uid = "unprivileged uid" if self.uid_drop else "same uid"
        return f"namespaces={ns}; {uid}; rlimits"


def _unshare_cmd(names: tuple[str, ...]) -> list[str]:
    cmd = ["unshare"]
    for name in names:
        cmd += NAMESPACES[name]
    if "mount" in names and "pid" in names:
        cmd.append("--mount-proc")
    return cmd


@functools.lru_cache(maxsize=4)
def probe_isolation(kind: str = "auto") -> Isolation:
    """Which namespaces this OS lets us create (tried once per process), warning about refusals."""
    uid_drop = os.geteuid() == 0
    if kind == "rlimits":
        return Isolation((), uid_drop)
    wanted = tuple(NAMESPACES)
    granted: tuple[str, ...] = ()
    if shutil.which("unshare"):
        if _try_unshare(wanted):
            granted = wanted
        else:
            granted = tuple(n for n in wanted if _try_unshare((n,)))
            if "pid" in granted and "mount" in granted and not _try_unshare(("mount", "pid")):
                granted = tuple(n for n in granted if n != "pid")
    refused = tuple(n for n in wanted if n not in granted)
    if refused:
        msg = (
            f"the OS refused {', '.join(refused)} namespace(s) for the APPS sandbox"
            + ("" if shutil.which("unshare") else " (no `unshare` binary)")
            + "; falling back to rlimits"
            + (", a dropped uid" if uid_drop else "")
            + " and session kills for those."
        )
        if kind == "namespaces":
            raise RunError(
                msg.replace("; falling back", ". sandbox=namespaces was asked; not falling back")
            )
        _warn_once(msg)
    if not uid_drop:
        _warn_once("not running as root: sandboxed programs keep the evaluator's uid")
    return Isolation(granted, uid_drop, refused)


def _try_unshare(names: tuple[str, ...]) -> bool:
    try:
        res = subprocess.run(
            [*_unshare_cmd(names), "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            env=SANDBOX_ENV,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@dataclass
class Sandbox:
    """One supervisor process; `run` sends a program and its test inputs, yields raw outcomes."""

    slot: int
    config: ExecConfig
    hide: tuple[str, ...] = ()
    isolation: Isolation = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)
    info: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.isolation = probe_isolation(self.config.sandbox)

    @property
    def uid(self) -> int | None:
        if not self.isolation.uid_drop:
            return None
        return UID_BASE + (os.getpid() % 4096) * 64 + self.slot % 64

    def start(self) -> None:
        ns = self.isolation.namespaces
        cmd = [*_unshare_cmd(ns)] if ns else []
        cmd += [sys.executable, "-I", "-B", str(RUNNER)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=SANDBOX_ENV,
            start_new_session=True,
            close_fds=True,
        )
        cfg = self.config
        setup = {
            "uid": self.uid,
            "mount_ns": "mount" in ns,
            "tmp_mb": cfg.tmp_mb,
            "hide": list(self.hide),
            "env": SANDBOX_ENV,
            "limits": {
                "memory_mb": cfg.memory_mb,
                "nproc": cfg.nproc,
                "fsize_mb": cfg.fsize_mb,
                "nofile": cfg.nofile,
                "stack_mb": cfg.stack_mb,
            },
        }
        try:
            send_json(self.proc.stdin.fileno(), setup)
            frame = recv_frame(self.proc.stdout.fileno(), time.monotonic() + 60)
        except (OSError, TimeoutError) as exc:
            frame = None
            err = str(exc)
        else:
            err = ""
        info = json.loads(frame) if frame else {}
        if not info.get("ready"):
            stderr = self._stderr_tail()
            self.kill()
            raise RunError(
                f"the APPS sandbox did not start ({info.get('error') or err or 'no answer'}). "
                f"{stderr}".strip()
            )
        self.info = info
        for w in info.get("warnings", []):
            _warn_once(f"sandbox: {w}")
        # stderr was only for start-up failures; the runner has pointed its fd 2 at /dev/null.
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def _stderr_tail(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(Exception):
            os.set_blocking(self.proc.stderr.fileno(), False)
            data = self.proc.stderr.read() or b""
            return data.decode("utf-8", "replace")[-2000:]
        return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run(self, job: dict, watchdog: float):
        """Send one job; yield (header, stdout bytes) per test. Raises TimeoutError/EOFError if the
        supervisor stops answering within `watchdog` seconds of the previous answer."""
        assert (
            self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        )
        send_json(self.proc.stdin.fileno(), job)
        out_fd = self.proc.stdout.fileno()
        while True:
            frame = recv_frame(out_fd, time.monotonic() + watchdog)
            if frame is None:
                raise EOFError("the sandbox supervisor exited")
            header = json.loads(frame)
            if header.get("done"):
                return
            out = b""
            if header.get("nout"):
                body = recv_frame(out_fd, time.monotonic() + watchdog)
                if body is None:
                    raise EOFError("the sandbox supervisor exited")
                out = body
            yield header, out

    def close(self) -> None:
        if self.proc is None:
            return
        if self.alive:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                send_json(self.proc.stdin.fileno(), {"op": "quit"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the session: unshare and the supervisor; with a PID namespace that ends every
        process inside it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self.proc = None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg in _WARNED:
        return
    _WARNED.add(msg)
    log.warning(msg)
    from wprctl.console import err_console

    err_console.print(f"[yellow]warning:[/] {msg}")
