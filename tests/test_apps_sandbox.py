"""The sandbox against hostile programs, and the two APPS program kinds.

Every hostile program must leave the evaluator (and the sandbox supervisor) alive, get the right
verdict, finish within its time bound, and leave no process and no file outside its directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from wprctl.codeexec import ExecConfig, ExecPool, Problem, SampleResult, evaluate_samples
from wprctl.codeexec.sandbox import UID_BASE, probe_isolation

TIMEOUT = 1.5
SLACK = 1.0  # supervisor overhead allowed on top of the per-test wall clock
CONFIG = ExecConfig(timeout=TIMEOUT, problem_budget=20, workers=2, memory_mb=128)

DOUBLE = Problem("double", inputs=["3\n", "4\n"], outputs=["6\n", "8\n"], difficulty="interview")
SINGLE = Problem("single", inputs=["3\n"], outputs=["6\n"], difficulty="interview")
ANSWER = "print(int(input()) * 2)\n"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pool():
    with ExecPool(CONFIG) as p:
        yield p


def sandbox_processes() -> list[int]:
    """Processes running as a sandbox uid (all program processes do when we run as root)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as fh:
                fields = dict(ln.split(":", 1) for ln in fh if ":" in ln)
            uid = int(fields["Uid"].split()[0])
        except (OSError, KeyError, ValueError):
            continue
        zombie = fields.get("State", "").strip().startswith("Z")  # dead, awaiting its reaper
        if UID_BASE <= uid < UID_BASE + 4096 * 64 and not zombie:
            found.append(int(d))
    return found


def run(pool: ExecPool, code: str, problem: Problem = DOUBLE) -> SampleResult:
    t0 = time.monotonic()
    (res,) = evaluate_samples(
        {problem.problem_id: problem},
        [(problem.problem_id, code)],
        pool=pool,
        progress=False,
        extract=False,
    )
    elapsed = time.monotonic() - t0
    # within its time bound
    assert all(t <= TIMEOUT + SLACK for t in res.times), res.times
    assert elapsed <= problem.n_tests * (TIMEOUT + SLACK) + 5, elapsed
    # no process left behind; the supervisors still serve
    assert sandbox_processes() == []
    assert all(sb.alive for sb in pool._all if sb.proc is not None)
    return res


def assert_still_works(pool: ExecPool) -> None:
    assert run(pool, ANSWER).verdicts == ["pass", "pass"]


HOSTILE = {
    # name: (program, allowed verdicts of each test)
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        {"timeout", "runtime_error"},
    ),
    "fork_bomb_exits": (
        "import os\nfor _ in range(10**6):\n    os.fork()\n",
        {"runtime_error", "timeout"},
    ),
    "memory_bomb": ("a = []\nwhile True:\n    a.append(bytearray(10**7))\n", {"runtime_error"}),
    "one_huge_allocation": ("x = ' ' * 10**11\n", {"runtime_error"}),
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}),
    "sleep_forever": ("import time\ntime.sleep(10**6)\n", {"timeout"}),
    "unbounded_output": ("while True:\n    print('x' * 10000)\n", {"fail"}),
    "closes_stdout_then_hangs": ("import os, time\nos.close(1)\ntime.sleep(100)\n", {"timeout"}),
    "threads_never_end": (
        "import threading, time\nthreading.Thread(target=lambda: time.sleep(1000)).start()\n"
        + ANSWER,
        {"timeout"},
    ),
    "deep_recursion": ("def f(n):\n    return f(n + 1) + 1\nf(0)\n", {"runtime_error"}),
    "deep_recursion_c_stack": (
        "import sys, functools\nsys.setrecursionlimit(10**7)\n@functools.lru_cache(None)\n"
        "def f(n):\n    return 0 if n == 0 else f(n - 1) + 1\nprint(f(10**6))\n",
        {"runtime_error"},
    ),
    "deep_recursion_raised_limit": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
        {"runtime_error", "timeout"},
    ),
    "sys_exit_before_printing": ("import sys\nsys.exit(0)\n" + ANSWER, {"fail"}),
    "os_exit_nonzero": (ANSWER + "import os\nos._exit(3)\n", {"runtime_error"}),
    "os_exit_before_flush": (ANSWER + "import os\nos._exit(0)\n", {"fail"}),  # as in real Python
    "stdin_read_past_eof": ("import sys\nsys.stdin.read()\ninput()\n", {"runtime_error"}),
    "syntax_error": ("def f(:\n", {"compile_error"}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program(pool: ExecPool, name: str) -> None:
    code, allowed = HOSTILE[name]
    res = run(pool, code, SINGLE)
    assert set(res.verdicts) <= allowed, (res.verdicts, res.errors)
    assert res.reward < 0


def test_hostile_programs_that_still_answer(pool: ExecPool, tmp_path: Path) -> None:
    """Programs that attack and then print the right answer: the attack fails, the answer counts."""
    victim_dir = HERE / "fixtures" / "apps" / f"_victim_{os.getpid()}"
    victim_dir.mkdir()
    victim = victim_dir / "keep.txt"
    victim.write_text("keep")
    tmp_victim = tmp_path / "keep.txt"
    tmp_victim.write_text("keep")
    escapes = [
        "/tmp/wprctl_escape_test",
        "/var/tmp/wprctl_escape_test",
        "/dev/shm/wprctl_escape_test",
        str(HERE / "wprctl_escape_test"),
        str(tmp_path / "escape"),
        "/wprctl_escape_test",
        "../wprctl_escape_test",
    ]
    programs = {
        "kills_its_parent": (
            "import os, signal\n"
            f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        ),
        "writes_outside": (
            f"for p in {escapes!r}:\n"
            "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
        ),
        "deletes_files": (
            "import os, shutil\n"
            f"for p in [{str(victim)!r}, {str(tmp_victim)!r}, {str(HERE / 'test_apps_sandbox.py')!r}]:\n"
            "    try:\n        os.remove(p)\n    except OSError:\n        pass\n"
            f"shutil.rmtree({str(victim_dir)!r}, ignore_errors=True)\n"
        ),
        "closes_stdout_after_answer": "import os, sys\nprint(int(input()) * 2, flush=True)\nos.close(1)\nos.close(0)\n#",
        "daemon_child_left_running": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n    os._exit(0)\n"
        ),
        "daemon_thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n",
        "ignores_big_stdin": "",  # run below with a 2 MB input it never reads
    }
    try:
        for name, attack in programs.items():
            # (a trailing '#' turns the appended answer into a comment: the program printed it)
            code = attack + ANSWER if name != "ignores_big_stdin" else "print(6)\n"
            problem = DOUBLE
            if name == "ignores_big_stdin":
                problem = Problem("big", inputs=["1 " * 10**6 + "\n"], outputs=["6\n"])
            res = run(pool, code, problem)
            assert set(res.verdicts) == {"pass"}, (name, res.verdicts, res.errors)
        assert victim.read_text() == "keep" and tmp_victim.read_text() == "keep"
        assert (HERE / "test_apps_sandbox.py").exists()
        for p in escapes:
            assert not Path(p).exists(), p
        assert not (HERE.parent / "wprctl_escape_test").exists()
        assert not list(Path("/tmp").glob("wprctl-sbx-*")) or not probe_isolation().namespaces
    finally:
        victim.unlink(missing_ok=True)
        victim_dir.rmdir()


def test_secret_environment_is_not_visible(pool: ExecPool, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-wprctl-test-secret-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    code = (
        "import os, glob\n"
        "found = [v for v in os.environ.values() if 'sk-wprctl' in v]\n"
        f"for p in glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ']:\n"
        "    try:\n        data = open(p, 'rb').read()\n    except OSError:\n        continue\n"
        "    if b'sk-wprctl' in data:\n        found.append(p)\n"
        "print(os.environ.get('OPENAI_API_KEY', 'none'), len(found))\n"
    )
    secret_problem = Problem("secret", inputs=["\n"], outputs=["none 0\n"])
    # a fresh pool started while the secret is in our environment
    with ExecPool(CONFIG.with_(workers=1)) as fresh:
        res = run(fresh, code, secret_problem)
    assert res.verdicts == ["pass"], res.errors


def test_no_network(pool: ExecPool) -> None:
    if "net" not in probe_isolation().namespaces:
        pytest.skip("the OS refused a network namespace")
    code = (
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n    print('online')\n"
        "except OSError:\n    print('offline')\n"
    )
    res = run(pool, code, Problem("net", inputs=["\n"], outputs=["offline\n"]))
    assert res.verdicts == ["pass"]


def test_tests_do_not_share_state(pool: ExecPool) -> None:
    # A file or a crash in one test changes nothing for the next.
    code = (
        "import os, sys\n"
        "if os.path.exists('state') or os.listdir('.') != ['solution.py']:\n    print('leak')\n"
        "open('state', 'w').write('x')\n"
        "n = int(input())\n"
        "if n == 3:\n    raise SystemExit(1)\n"
        "print(n * 2)\n"
    )
    res = run(pool, code)
    assert res.verdicts == ["runtime_error", "pass"]
    assert_still_works(pool)


def test_sandbox_is_isolated() -> None:
    iso = probe_isolation()
    # This machine and CI allow all namespaces and run as root (issue 7); elsewhere we fall back.
    if os.geteuid() == 0 and os.environ.get("CI_NO_NAMESPACES") is None:
        assert set(iso.namespaces) == {"net", "mount", "pid", "ipc", "uts"}
        assert iso.uid_drop
    code = "import os\nprint(os.getuid() != 0, os.getpid() < 100)\n"
    (res,) = evaluate_samples(
        {"iso": Problem("iso", inputs=["\n"], outputs=["True True\n"])},
        [("iso", code)],
        CONFIG.with_(workers=1),
        progress=False,
    )
    if iso.uid_drop and "pid" in iso.namespaces:
        assert res.verdicts == ["pass"], res.errors


# ---------------------------------------------------------------------------------------------
# the two program kinds


def test_stdin_programs_are_real_main(pool: ExecPool) -> None:
    programs = [
        "import sys\nprint(int(sys.stdin.buffer.read().split()[0]) * 2)\n",
        "def main():\n    print(int(input()) * 2)\n\nif __name__ == '__main__':\n    main()\n",
        ANSWER + "exit()\n",
        ANSWER + "quit()\n",
        "import sys\nsys.stdout.write(str(int(sys.stdin.readline()) * 2) + '\\n')\nsys.exit()\n",
        "import atexit, io, sys\nbuf = io.StringIO()\nsys.stdout = buf\n"
        "atexit.register(lambda: sys.__stdout__.write(buf.getvalue()))\n" + ANSWER,
        "from sys import stdin\nfor line in stdin:\n    print(int(line) * 2)\n",
    ]
    for code in programs:
        res = run(pool, code)
        assert res.verdicts == ["pass", "pass"], (code, res.errors)
        assert res.reward == pytest.approx(1.0)


def test_call_based_function_and_class(pool: ExecPool) -> None:
    fn = Problem(
        "fn",
        inputs=[[2], [5]],
        outputs=[[False], [True]],
        fn_name="is_odd",
        starter_code="def is_odd(n):\n\t",
    )
    assert run(pool, "def is_odd(n):\n    return n % 2 == 1\n", fn).verdicts == ["pass", "pass"]
    assert run(pool, "def is_odd(n):\n    return True\n", fn).verdicts == ["fail", "pass"]
    assert run(pool, "def other(n):\n    return 1\n", fn).verdicts == ["compile_error"] * 2
    assert run(pool, "def is_odd(n):\n    return 1 // (n - 2) == 0\n", fn).verdicts == [
        "runtime_error",
        "pass",
    ]
    # the test code under a __main__ guard must not run for a call-based problem
    guarded = "def is_odd(n):\n    return n % 2 == 1\nif __name__ == '__main__':\n    input()\n"
    assert run(pool, guarded, fn).verdicts == ["pass", "pass"]
    cls = Problem(
        "cls",
        inputs=[[[2, 3, 4, 7, 11], 5], [[1, 2, 3, 4], 2]],
        outputs=[9, 6],
        fn_name="findKthPositive",
        starter_code="class Solution:\n    def findKthPositive(self, arr: List[int], k: int) -> int:\n        ",
    )
    code = (
        "class Solution:\n    def findKthPositive(self, arr: List[int], k: int) -> int:\n"
        "        s = set(arr)\n        i = 0\n        while k:\n            i += 1\n"
        "            k -= i not in s\n        return i\n"
    )
    assert run(pool, code, cls).verdicts == ["pass", "pass"]
    tup = Problem("tup", inputs=[[3]], outputs=[[1, 2]], fn_name="pair")
    assert run(pool, "def pair(n):\n    return (1, 2)\n", tup).verdicts == ["pass"]
    # an unserializable return value is a wrong answer, not a crash of the evaluator
    assert run(pool, "def pair(n):\n    return {1, 2}\n", tup).verdicts == ["fail"]


def test_fallback_without_namespaces() -> None:
    """sandbox=rlimits (what is left where the OS refuses namespaces): limits, session kills and
    the uid sweep still hold."""
    cfg = CONFIG.with_(sandbox="rlimits", workers=1)
    with ExecPool(cfg) as fallback:
        assert run(fallback, ANSWER).verdicts == ["pass", "pass"]
        daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n    os._exit(0)\n"
        assert run(fallback, daemon + ANSWER).verdicts == ["pass", "pass"]
        for name in ("fork_bomb", "infinite_loop", "memory_bomb", "unbounded_output"):
            code, allowed = HOSTILE[name]
            assert set(run(fallback, code, SINGLE).verdicts) <= allowed, name
        base = fallback._all[0].info["workdir_base"]
        assert Path(base).is_dir() and os.listdir(base) == []  # test directories are removed
    assert not Path(base).exists()
    assert sandbox_processes() == []


@pytest.mark.parametrize("kind", ["auto", "rlimits"])
def test_evaluator_killed_leaves_nothing(tmp_path: Path, kind: str) -> None:
    """If the evaluator dies (SIGKILL) mid-test, the sandbox notices and removes everything."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "evaluator.py"
    script.write_text(
        "from wprctl.codeexec import ExecConfig, Problem, evaluate_samples\n"
        "p = Problem('x', inputs=['\\n'], outputs=['\\n'])\n"
        "code = 'import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(1000)\\ntime.sleep(1000)'\n"
        "print('started', flush=True)\n"
        f"evaluate_samples({{'x': p}}, [('x', code)], ExecConfig(workers=1, timeout=60, sandbox={kind!r}),"
        " progress=False, extract=False)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 20
        while len(sandbox_processes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sandbox_processes()) >= 2  # the program and its daemon are running
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def test_sample_budget_caps_total_time() -> None:
    many = Problem("many", inputs=["\n"] * 6, outputs=["\n"] * 6)
    with ExecPool(CONFIG.with_(problem_budget=2.0, workers=1)) as small:
        t0 = time.monotonic()
        res = run(small, "while True:\n    pass\n", many)
        assert time.monotonic() - t0 < 2.0 + TIMEOUT + SLACK
    assert res.verdicts == ["timeout"] * 6
    assert "sample budget exhausted" in (res.errors[-1] or "")


def test_program_cannot_forge_a_harness_error(pool: ExecPool) -> None:
    fn = Problem("forge", inputs=[[1]], outputs=[1], fn_name="f")
    code = (
        "import os, json\n"
        "os.write(3, json.dumps({'harness_error': 'forged'}).encode())\n"
        "def f(x):\n    return x\n"
    )
    res = run(pool, code, fn)  # no RunError: the evaluation goes on
    assert res.verdicts in (["fail"], ["runtime_error"])


def test_a_policy_rewarded_by_tests_cannot_read_them_nor_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPO's execution reward on APPS: the problems file (data.path, relative to the manifest's
    folder, run from elsewhere) and the project's output folder are hidden from the programs,
    which still see the rest of the file system."""
    import shutil

    from wprctl.manifest import load_manifest
    from wprctl.rl.online import build_reward_fn

    # not under /tmp, which every sandbox replaces with an empty one of its own anyway
    project = HERE / f"_project_{os.getpid()}"
    (project / "data").mkdir(parents=True)
    shutil.copy(HERE / "fixtures" / "apps" / "apps.jsonl", project / "data" / "apps.jsonl")
    (project / "runs" / "ppo" / "checkpoints").mkdir(parents=True)
    (project / "wprctl.toml").write_text(
        '[project]\noutput_dir = "runs"\n[data]\ndataset = "apps"\npath = "data/apps.jsonl"\n'
    )
    monkeypatch.chdir(tmp_path)
    try:
        reward = build_reward_fn(
            load_manifest(project / "wprctl.toml"), None, None, stage="ppo", pad_id=0
        )
    except BaseException:
        shutil.rmtree(project)
        raise
    assert len(reward.problems) > 0  # read from the manifest's folder, not the working one
    secret, ckpt = project / "data" / "apps.jsonl", project / "runs" / "ppo" / "checkpoints"
    code = f"import os\nprint(os.path.exists({str(secret)!r}), os.path.isdir({str(ckpt)!r}))\n"
    seen = Problem("look", inputs=["\n"], outputs=["False False\n"])
    try:
        if probe_isolation().namespaces:
            assert run(reward.pool, code, seen).verdicts == ["pass"]
        assert run(reward.pool, "print(int(input()) * 2)\n").verdicts == ["pass", "pass"]
    finally:
        reward.pool.close()
        shutil.rmtree(project)
