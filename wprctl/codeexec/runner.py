"""The in-sandbox harness: one long-lived supervisor per sandbox, one forked process per test.

This file runs as a standalone script (`python -I runner.py`, stdlib only) inside the sandbox that
`sandbox.py` starts, usually as PID 1 of fresh PID/mount/network/IPC namespaces. It is trusted
code; the programs it runs are not. For every test it forks a child that drops to an unprivileged
uid, takes its resource limits, gets a fresh working directory and a new session, and runs the
program as a real ``__main__`` (stdin kind) or calls its function (call kind). The supervisor
enforces the wall clock, caps captured output, kills the whole session and every leftover process
of the sandbox, and removes the directory before the next test, so no test can leak state,
processes or files into another.

The supervisor never receives expected outputs: the child is a copy of its memory, and a program
must not be able to find the answers there. Comparison happens in the evaluator.

Protocol on fds 0/1 (then moved away from 0/1): frames of a 4-byte big-endian length and a
payload; JSON headers, raw bytes for captured stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time

# ---------------------------------------------------------------------------------------------
# framing (imported by the evaluator side as well)

_LEN = struct.Struct(">I")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def send_frame(fd: int, payload: bytes) -> None:
    write_all(fd, _LEN.pack(len(payload)) + payload)


def send_json(fd: int, obj: object) -> None:
    send_frame(fd, json.dumps(obj).encode())


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no frame from the sandbox before the deadline")
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(fd: int, deadline: float | None = None) -> bytes | None:
    """One frame, or None on EOF; TimeoutError when `deadline` (monotonic) passes first."""
    head = _read_exact(fd, _LEN.size, deadline)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    body = _read_exact(fd, n, deadline)
    if body is None:
        return None
    return body


# ---------------------------------------------------------------------------------------------
# what programs see

# The import prelude of the original APPS harness (hendrycks/apps, eval/testing_util.py). Call-based
# problems always get it (LeetCode/Codewars solutions rely on their platform's imports, e.g.
# `List`); stdin programs get it only in compat mode, as in APPS.
APPS_PRELUDE = """\
import sys
import time
import itertools
from itertools import accumulate, product, permutations, combinations
import collections
from collections import Counter, OrderedDict, deque, defaultdict, ChainMap
from functools import lru_cache
import math
from math import sqrt, sin, cos, tan, ceil, fabs, floor, gcd, exp, log, log2
import fractions
from typing import List, Tuple
try:
    import numpy as np
except ImportError:
    pass
import random
import heapq
from heapq import *
"""

# Imported once by the supervisor so that each forked test starts warm.
WARM_MODULES = [
    "array",
    "bisect",
    "collections",
    "copy",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "heapq",
    "io",
    "itertools",
    "math",
    "operator",
    "queue",
    "random",
    "re",
    "statistics",
    "string",
    "threading",
    "time",
    "typing",
    "traceback",
]

_COMPILE_ERROR_EXIT = 0  # compile errors are reported on the result fd, the exit status is moot
_HARNESS_BUG_EXIT = 113
_STARTED = b"S"

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    _libc.prctl(option, arg, 0, 0, 0)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _interpreter_dirs() -> list[str]:
    """The directories a program's imports need (interpreter prefixes and sys.path)."""
    dirs = {
        os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))
    }
    dirs |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    top = sorted(dirs, key=len)
    return [d for i, d in enumerate(top) if not any(_under(d, e) for e in top[:i])]


def _blocking_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that others may not traverse, if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return None
    return None


def _hide_dir(target: str, keep: list[str]) -> str | None:
    """Cover `target` with an empty read-only tmpfs, then bind the `keep` directories inside it
    back in place (read-only)."""
    holders = []
    for n, k in enumerate(keep):
        holder = f"/tmp/.keep{n}"
        os.makedirs(holder, exist_ok=True)
        if _libc.mount(k.encode(), holder.encode(), None, MS_BIND | MS_REC, None) != 0:
            return f"bind {k}: {os.strerror(ctypes.get_errno())}; not hiding {target}"
        holders.append((holder, k))
    err = _mount_tmpfs(target, "size=1m,mode=755")
    if err:
        return err
    for holder, k in holders:
        os.makedirs(k, exist_ok=True)
        if _libc.mount(holder.encode(), k.encode(), None, MS_BIND | MS_REC, None) != 0:
            return f"bind {k} back: {os.strerror(ctypes.get_errno())}"
        _libc.mount(None, k.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC, None)
        _libc.umount2(holder.encode(), MNT_DETACH)
        os.rmdir(holder)
    _libc.mount(None, target.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    return None


def _mount_tmpfs(target: str, options: str, readonly: bool = False) -> str | None:
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    rc = _libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, options.encode())
    if rc != 0:
        return f"mount tmpfs on {target}: {os.strerror(ctypes.get_errno())}"
    return None


# ---------------------------------------------------------------------------------------------
# the supervisor


class Supervisor:
    def __init__(self, setup: dict, ctrl_in: int, ctrl_out: int) -> None:
        self.ctrl_in, self.ctrl_out = ctrl_in, ctrl_out
        self.uid: int | None = setup.get("uid")
        self.pid1 = os.getpid() == 1
        self.warnings: list[str] = []
        self.limits = setup["limits"]
        self.env = setup["env"]
        self.private_tmp = False
        if self.uid is not None and os.geteuid() != 0:
            self.warnings.append("not root: programs keep the evaluator's uid")
            self.uid = None
        if setup.get("mount_ns"):
            self._private_mounts(setup)
        if not self.pid1:
            # Orphans of a program then reparent here instead of to the host's init, so the
            # cleanup after each test can reap them.
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if self.uid is not None and not setup.get("mount_ns"):
            blocked = {_blocking_ancestor(k) for k in _interpreter_dirs()} - {None}
            if blocked:
                self.warnings.append(
                    f"programs run as uid {self.uid} cannot enter {', '.join(sorted(blocked))}, where "
                    "the interpreter lives: they can only import the modules the supervisor preloads"
                )
        if self.private_tmp:
            self.base = "/tmp/run"
            os.makedirs(self.base, mode=0o755, exist_ok=True)
        else:
            import tempfile

            self.base = tempfile.mkdtemp(prefix="wprctl-sbx-")
            os.chmod(self.base, 0o755)
        self.preludes = {"apps": {}, "none": {}}
        exec(compile(APPS_PRELUDE, "<prelude>", "exec"), self.preludes["apps"])
        self.preludes["apps"].pop("__builtins__", None)
        for name in WARM_MODULES:
            with contextlib.suppress(ImportError):
                __import__(name)
        # The program's baseline address space is the supervisor's; the limit is on top of it.
        self.base_vm = _vm_size()
        self.counter = 0
        self.orphaned = False

    def _private_mounts(self, setup: dict) -> None:
        tmp_opts = f"size={int(setup.get('tmp_mb', 256))}m,mode=755"
        err = _mount_tmpfs("/tmp", tmp_opts)
        if err:
            self.warnings.append(err + " (using a host temporary directory)")
        else:
            self.private_tmp = True
        # World-writable places a program could otherwise use to leave files behind.
        for d in ("/var/tmp", "/dev/shm", "/run/lock", "/var/lock"):
            if os.path.isdir(d) and not os.path.islink(d):
                err = _mount_tmpfs(d, "size=1m,mode=755", readonly=True)
                if err:
                    self.warnings.append(err)
        keep = _interpreter_dirs()
        hide = {os.path.realpath(d) for d in setup.get("hide", [])}
        # A directory on the way to the interpreter that the program's uid cannot enter (e.g. a
        # Python under /root, mode 700) is hidden too, with the interpreter put back inside it.
        if self.uid is not None:
            hide |= {_blocking_ancestor(k) for k in keep} - {None}
        for d in sorted(hide, key=len):
            if d == "/" or (self.private_tmp and (d + "/").startswith("/tmp/")):
                continue  # a fresh /tmp already hides the host's
            if any(_under(d, k) for k in keep) or not os.path.isdir(d):
                continue
            err = _hide_dir(d, [k for k in keep if _under(k, d)])
            if err:
                self.warnings.append(err)

    def serve(self) -> None:
        while True:
            frame = recv_frame(self.ctrl_in)
            if frame is None:
                return
            job = json.loads(frame)
            if job.get("op") == "quit":
                return
            self.run_job(job)

    def run_job(self, job: dict) -> None:
        tests = job["tests"]
        start = time.monotonic()
        budget = float(job["budget"])
        for i, test in enumerate(tests):
            left = budget - (time.monotonic() - start)
            if left <= 0:
                self._send(
                    {"i": i, "status": "timeout", "error": "sample budget exhausted", "time": 0.0}
                )
                continue
            header, out = self.run_one(job, i, test, min(float(job["timeout"]), left))
            self._send(header, out)
            if header["status"] == "compile_error":
                for j in range(i + 1, len(tests)):
                    self._send(dict(header, i=j, time=0.0))
                break
        send_json(self.ctrl_out, {"done": True})

    def _send(self, header: dict, out: bytes = b"") -> None:
        header["nout"] = len(out)
        send_json(self.ctrl_out, header)
        if out:
            send_frame(self.ctrl_out, out)

    # -- one test ------------------------------------------------------------------------------

    def run_one(self, job: dict, i: int, test: object, timeout: float) -> tuple[dict, bytes]:
        self.counter += 1
        workdir = os.path.join(self.base, str(self.counter))
        os.mkdir(workdir, 0o700)
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        stdin_data = test.encode() if job["kind"] == "stdin" else b""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(in_w)
                os.close(out_r)
                os.close(err_r)
                os.close(res_r)
                self.child(job, test, workdir, in_r, out_w, err_w, res_w, timeout)
            except BaseException as exc:
                # Our failure before the program ran (e.g. setuid refused): say so, so that the
                # evaluator stops instead of blaming the program.
                msg = json.dumps({"harness_error": f"{type(exc).__name__}: {exc}"}).encode()
                for fd in (3, res_w):
                    with contextlib.suppress(OSError):
                        write_all(fd, msg)
                        break
            os._exit(_HARNESS_BUG_EXIT)
        for fd in (in_r, out_w, err_w, res_w):
            os.close(fd)
        try:
            header, out = self._supervise(
                pid, job, i, t0, timeout, stdin_data, in_w, out_r, err_r, res_r
            )
        finally:
            self._cleanup(pid)
            shutil.rmtree(workdir, ignore_errors=True)
        if self.orphaned:
            raise SystemExit(0)  # the evaluator is gone: stop, everything is cleaned up
        return header, out

    def _supervise(self, pid, job, i, t0, timeout, stdin_data, in_w, out_r, err_r, res_r):
        cap_out = int(job["caps"][i])
        caps = {out_r: cap_out, err_r: 8192, res_r: int(job.get("result_cap", 1 << 24))}
        bufs: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
        open_fds = set(bufs)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        # Nothing arrives on the control channel during a job unless the evaluator is gone (EOF).
        poller.register(self.ctrl_in, select.POLLIN)
        pending = memoryview(stdin_data)
        if pending:
            os.set_blocking(in_w, False)
            poller.register(in_w, select.POLLOUT)
        else:
            os.close(in_w)
            in_w = -1
        deadline = t0 + timeout
        status: str | None = None
        wait_status = None
        rusage = None
        exited_at = None
        try:
            while status is None:
                now = time.monotonic()
                if exited_at is not None and (not open_fds or now - exited_at > 0.05):
                    break  # descendants may hold the pipes open; do not wait for them
                if now >= deadline:
                    status = "timeout"
                    break
                wait_ms = (min(deadline, (exited_at or now) + 0.05) - now) * 1000
                for fd, ev in poller.poll(max(1, int(wait_ms))):
                    if fd == self.ctrl_in:
                        self.orphaned = True
                        status = "aborted"
                        break
                    if fd == pidfd:
                        _, wait_status, rusage = os.wait4(pid, 0)
                        exited_at = time.monotonic()
                        poller.unregister(pidfd)
                    elif fd == in_w:
                        try:
                            n = os.write(in_w, pending[: 1 << 16])
                            pending = pending[n:]
                        except (BrokenPipeError, BlockingIOError) as exc:
                            if isinstance(exc, BrokenPipeError):
                                pending = pending[:0]
                        if not pending or ev & (select.POLLERR | select.POLLHUP):
                            poller.unregister(in_w)
                            os.close(in_w)
                            in_w = -1
                    else:
                        chunk = os.read(fd, 1 << 16)
                        if not chunk:
                            poller.unregister(fd)
                            open_fds.discard(fd)
                            continue
                        buf = bufs[fd]
                        room = caps[fd] - len(buf)
                        buf += chunk[: max(room, 0)]
                        if len(chunk) > room and fd != err_r:
                            status = "output_limit"
                            break
        finally:
            os.close(pidfd)
            for fd in (in_w, out_r, err_r, res_r):
                if fd >= 0:
                    os.close(fd)
        elapsed = (exited_at or time.monotonic()) - t0
        if wait_status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, wait_status, rusage = os.wait4(pid, 0)
        header: dict = {"i": i, "time": round(elapsed, 6)}
        if rusage is not None:
            header["cpu"] = round(rusage.ru_utime + rusage.ru_stime, 6)
        stderr_tail = bytes(bufs[err_r]).decode("utf-8", "replace")
        result = _parse_result(bytes(bufs[res_r]))
        if status is None:
            if "harness_error" in result:
                status = "harness_error"
                header["error"] = result["harness_error"]
            elif "compile_error" in result:
                status = "compile_error"
                header["error"] = result["compile_error"]
            elif os.WIFSIGNALED(wait_status):
                sig = os.WTERMSIG(wait_status)
                status = "runtime_error"
                header["error"] = _signal_message(sig, stderr_tail)
            elif os.WEXITSTATUS(wait_status) != 0:
                status = "runtime_error"
                code = os.WEXITSTATUS(wait_status)
                header["error"] = _last_line(stderr_tail) or f"exit status {code}"
                header["exit_code"] = code
            elif job["kind"] == "call" and "return" not in result:
                status = "runtime_error"
                header["error"] = (
                    result.get("error") or "the function returned nothing we could read"
                )
            else:
                status = "ok"
                if job["kind"] == "call":
                    header["return"] = result["return"]
        elif status == "timeout":
            header["error"] = f"wall-clock limit of {timeout:.3g}s"
        else:
            header["error"] = f"output over the {cap_out}-byte cap"
        header["status"] = status
        return header, bytes(bufs[out_r])

    def _cleanup(self, pid: int) -> None:
        """Kill the test's session and every process it left anywhere in the sandbox, reap them."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.sweep()

    def sweep(self) -> None:
        if self.pid1:
            # As PID 1 of the namespace, kill(-1) reaches every other process in it and nothing
            # outside it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
        elif self.uid is not None:
            # Without a PID namespace: a helper with the program's uid kills everything that uid
            # owns (a program cannot escape a uid it cannot change).
            helper = os.fork()
            if helper == 0:  # pragma: no cover - child
                try:
                    os.setgid(self.uid)
                    os.setuid(self.uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        end = time.monotonic() + 2.0
        while True:
            try:
                reaped, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped == 0:
                if time.monotonic() > end:
                    return  # only reachable without a PID namespace and without a uid to sweep
                time.sleep(0.001)

    # -- the child -----------------------------------------------------------------------------

    def child(self, job, test, workdir, in_r, out_w, err_w, res_w, timeout):  # pragma: no cover
        os.setsid()
        for target, fd in ((0, in_r), (1, out_w), (2, err_w), (3, res_w)):
            os.dup2(fd, target)
        os.closerange(4, 1 << 16)
        os.chdir(workdir)
        self._limit(timeout)
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(self.env)
        os.environ["HOME"] = workdir
        run_program(job, test, workdir, self.preludes)

    def _limit(self, timeout: float) -> None:
        lim = self.limits
        mem = self.base_vm + int(lim["memory_mb"]) * (1 << 20)
        cpu = int(timeout) + 1
        for res, value in (
            (resource.RLIMIT_AS, mem),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_NPROC, int(lim["nproc"])),
            (resource.RLIMIT_FSIZE, int(lim["fsize_mb"]) * (1 << 20)),
            (resource.RLIMIT_NOFILE, int(lim["nofile"])),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_STACK, min(mem, int(lim["stack_mb"]) * (1 << 20))),
        ):
            resource.setrlimit(res, (value, value))


def run_program(job: dict, test: object, workdir: str, preludes: dict) -> None:  # pragma: no cover
    """In the test's child: run the program as a real process would, then exit."""
    import builtins
    import io
    import types

    call = job["kind"] == "call"
    # From here on the program's text is in play: results that follow this mark cannot claim to be
    # harness errors (a program could otherwise forge one to abort the whole evaluation).
    write_all(3, _STARTED)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)),
        encoding="utf-8",
        errors="surrogateescape",
    )
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8"
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    path = os.path.join(workdir, "solution.py")
    source = job["code"]
    with (
        contextlib.suppress(OSError),
        open(path, "w", encoding="utf-8", errors="surrogatepass") as fh,
    ):
        fh.write(source)
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        _report({"compile_error": f"{type(exc).__name__}: {exc}"})
        os._exit(_COMPILE_ERROR_EXIT)
    if not call:
        os.close(3)  # a stdin program has no business with the result channel
    module = types.ModuleType("solution" if call else "__main__")
    module.__dict__.update(preludes["apps" if call or job.get("prelude") == "apps" else "none"])
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules[module.__name__] = module
    sys.argv = [path]
    status = 0
    try:
        exec(code, module.__dict__)
        if call:
            fn = _resolve(module.__dict__, job["fn_name"], job.get("use_class", False))
            if fn is None:
                _report({"compile_error": f"no function named {job['fn_name']!r} in the program"})
                os._exit(_COMPILE_ERROR_EXIT)
            value = fn(*test)
            _report({"return": value})
    except SystemExit as exc:
        status = _exit_status(exc)
    except BaseException as exc:
        _print_exception(exc)
        status = 1
    os._exit(_finish(status))


def _print_exception(exc: BaseException) -> None:  # pragma: no cover - child
    # The interpreter's own (C) printer: it caps the traceback at 1000 entries, where the
    # traceback module would spend seconds formatting a million-frame recursion.
    with contextlib.suppress(BaseException):
        sys.__excepthook__(type(exc), exc, exc.__traceback__)


def _resolve(ns: dict, fn_name: str, use_class: bool):
    sol = ns.get("Solution")
    if use_class or (fn_name not in ns and isinstance(sol, type)):
        if isinstance(sol, type) and hasattr(sol, fn_name):
            return getattr(sol(), fn_name)
        return None
    fn = ns.get(fn_name)
    return fn if callable(fn) else None


def _report(obj: dict) -> None:  # pragma: no cover - child
    def default(x):
        if isinstance(x, (set, frozenset)):
            return {"__unserializable__": repr(x)}
        return {"__unserializable__": repr(x)[:200]}

    try:
        data = json.dumps(obj, default=default, allow_nan=True).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        data = json.dumps({"error": f"cannot serialize the return value: {exc}"}).encode()
    with contextlib.suppress(OSError):
        write_all(3, data)
        os.close(3)


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _finish(status: int) -> int:  # pragma: no cover - child
    """What the interpreter does on exit: join non-daemon threads, atexit, flush the streams."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except SystemExit as exc:
        status = _exit_status(exc)
    except BaseException:
        status = status or 1
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    return status


def _parse_result(data: bytes) -> dict:
    started = data.startswith(_STARTED)
    data = data[len(_STARTED) :] if started else data
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return {"error": "unreadable result"}
    if not isinstance(obj, dict):
        return {"error": "unreadable result"}
    if started:
        obj.pop("harness_error", None)
    return obj


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _signal_message(sig: int, stderr_tail: str) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = {"SIGXCPU": " (CPU time limit)", "SIGSEGV": " (stack overflow?)", "SIGKILL": ""}
    return f"killed by {name}{hint.get(name, '')}" + (
        f": {_last_line(stderr_tail)}" if _last_line(stderr_tail) else ""
    )


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:  # pragma: no cover - exercised through the sandbox
    # Keep the control channel off 0/1/2 so nothing forked later inherits it by accident.
    ctrl_in = os.dup(0)
    ctrl_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    _prctl(PR_SET_DUMPABLE, 0)  # nothing of ours to ptrace or read through /proc
    # No parent-death signal here: when the evaluator dies we see EOF on the control channel and
    # exit after killing the running test, which a SIGKILL would not let us do.
    frame = recv_frame(ctrl_in)
    if frame is None:
        return
    try:
        sup = Supervisor(json.loads(frame), ctrl_in, ctrl_out)
    except Exception as exc:
        send_json(ctrl_out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    send_json(
        ctrl_out,
        {
            "ready": True,
            "pid1": sup.pid1,
            "uid": sup.uid,
            "private_tmp": sup.private_tmp,
            "workdir_base": sup.base,
            "warnings": sup.warnings,
        },
    )
    os.dup2(devnull, 2)
    try:
        sup.serve()
    finally:
        sup.sweep()
        if not sup.private_tmp:
            shutil.rmtree(sup.base, ignore_errors=True)


if __name__ == "__main__":
    main()
