"""The one library entry point: run completions against APPS tests in sandboxes, in parallel.

    results = evaluate_samples(problems, [(problem_id, completion), ...], ExecConfig())

Used by `wprctl apps-eval`, PPO's APPS reward and DAR. A pool of sandboxes (one per worker) can be
kept open across calls (`ExecPool`) so a training loop does not pay the start-up each step.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wprctl.codeexec.compare import outputs_match
from wprctl.codeexec.config import ExecConfig
from wprctl.codeexec.extract import extract_code
from wprctl.codeexec.problems import Problem
from wprctl.codeexec.sandbox import Sandbox, probe_isolation
from wprctl.errors import RunError, UserError

if TYPE_CHECKING:
    from wprctl.manifest import Manifest

# Verdict names and their APPS integers (a timeout is -1 in APPS, like a runtime error).
VERDICT_CODES = {"pass": 1, "fail": 0, "runtime_error": -1, "timeout": -1, "compile_error": -2}

# Supervisor overhead allowed on top of a test's wall clock before we declare the sandbox hung.
_WATCHDOG_SLACK = 10.0


@dataclass
class SampleResult:
    problem_id: str
    sample: int
    verdicts: list[str] = field(default_factory=list)  # one per test
    times: list[float] = field(default_factory=list)  # wall-clock seconds per test
    errors: list[str | None] = field(default_factory=list)
    difficulty: str = "unknown"
    reward: float = 0.0

    @property
    def codes(self) -> list[int]:
        return [VERDICT_CODES[v] for v in self.verdicts]

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def passed(self) -> int:
        return sum(v == "pass" for v in self.verdicts)

    @property
    def pass_fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            id=d.pop("problem_id"),
            results=self.codes,
            passed=self.passed,
            total=self.total,
            all_passed=self.all_passed,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleResult:
        """The inverse of ``to_dict`` (its derived fields are recomputed)."""
        return cls(
            problem_id=str(d["id"]),
            sample=int(d["sample"]),
            verdicts=list(d["verdicts"]),
            times=list(d["times"]),
            errors=list(d["errors"]),
            difficulty=str(d["difficulty"]),
            reward=float(d["reward"]),
        )


def sample_reward(verdicts: Sequence[str]) -> float:
    """The paper's per-sample reward: -1.0 on a compile error, -0.6 on a runtime error (a timeout
    counts as one, as in APPS/CodeRL), otherwise -0.3 + 1.3 x the fraction of tests passed."""
    if any(v == "compile_error" for v in verdicts):
        return -1.0
    if any(v in ("runtime_error", "timeout") for v in verdicts):
        return -0.6
    frac = sum(v == "pass" for v in verdicts) / len(verdicts) if verdicts else 0.0
    return -0.3 + 1.3 * frac


def default_hidden_paths() -> list[str]:
    """Places with credentials or caches a program has no business reading."""
    home = os.path.expanduser("~")
    out = [home] if home not in ("/", "") else []
    out += [os.path.join(home, d) for d in (".cache", ".config", ".ssh", ".aws", ".huggingface")]
    return out


def folders_of(*paths: str | Path | None) -> list[str]:
    """The folders holding these local files (a folder stands for itself); hub ids, missing paths
    and None are skipped. For what a program under evaluation must not read: the problems' tests
    and reference solutions, the generations, a project's checkpoints."""
    out = []
    for p in paths:
        if p is None or not Path(p).expanduser().exists():
            continue
        path = Path(p).expanduser().resolve()
        out.append(str(path if path.is_dir() else path.parent))
    return list(dict.fromkeys(out))


def hidden_in_project(manifest: Manifest) -> list[str]:
    """What a program that a project runs for a reward must not read: the problems' tests and
    solutions (apps.problems, data.path) and the project's outputs (its checkpoints)."""
    specs = [s for s in (manifest.apps.problems, manifest.data.path) if s]
    return folders_of(*(manifest.locate(s) for s in specs), manifest.output_dir)


class ExecPool:
    """`workers` sandboxes, started on first use, reused across samples and calls."""

    def __init__(self, config: ExecConfig, hide: Iterable[str] = ()) -> None:
        self.config = config
        self.isolation = probe_isolation(config.sandbox)
        hidden = tuple(dict.fromkeys([*default_hidden_paths(), *hide]))
        self._free: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all = [Sandbox(i, config, hidden) for i in range(config.n_workers)]
        for sb in self._all:
            self._free.put(sb)

    @property
    def size(self) -> int:
        return len(self._all)

    def __enter__(self) -> ExecPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sb in self._all:
            sb.close()

    def __del__(self) -> None:  # a forgotten pool must not leave sandboxes running
        with contextlib.suppress(Exception):
            self.close()

    def run(self, problem: Problem, code: str, sample: int) -> SampleResult:
        sb = self._free.get()
        try:
            return run_sample(sb, problem, code, sample, self.config)
        finally:
            self._free.put(sb)


def run_sample(
    sb: Sandbox, problem: Problem, code: str, sample: int, cfg: ExecConfig
) -> SampleResult:
    """All tests of one program in one sandbox; restarts the sandbox if its supervisor dies."""
    res = SampleResult(problem.problem_id, sample, difficulty=problem.difficulty)
    t0 = time.monotonic()
    n = problem.n_tests
    while res.total < n:
        left = cfg.problem_budget - (time.monotonic() - t0)
        if left <= 0:
            _record(res, "timeout", 0.0, "sample budget exhausted")
            continue
        start = res.total
        try:
            if not sb.alive:
                sb.start()
            job = _job(problem, code, start, left, cfg)
            for header, out in sb.run(job, watchdog=cfg.timeout + _WATCHDOG_SLACK):
                _record(res, *_judge(header, out, problem, start + int(header["i"]), cfg))
        except (TimeoutError, EOFError, OSError) as exc:
            # Not the program's doing as far as we can tell (the supervisor is out of its reach),
            # but the test cannot be trusted: count it as a runtime error, go on in a fresh sandbox.
            sb.kill()
            if res.total < n:
                _record(res, "runtime_error", time.monotonic() - t0, f"sandbox failure: {exc}")
    res.reward = sample_reward(res.verdicts)
    return res


def _record(res: SampleResult, verdict: str, seconds: float, error: str | None) -> None:
    res.verdicts.append(verdict)
    res.times.append(round(seconds, 6))
    res.errors.append(error)


def _job(problem: Problem, code: str, start: int, budget: float, cfg: ExecConfig) -> dict[str, Any]:
    cap = int(cfg.output_limit_mb * (1 << 20))
    if problem.kind == "stdin":
        caps = [max(cap, 2 * len(o.encode()) + 4096) for o in problem.outputs[start:]]
    else:
        caps = [1 << 20] * (problem.n_tests - start)
    return {
        "op": "run",
        "code": code,
        "kind": problem.kind,
        "fn_name": problem.fn_name,
        "use_class": problem.use_class,
        "tests": problem.inputs[start:],
        "caps": caps,
        "result_cap": max(cap, 4 * len(repr(problem.outputs))),
        "timeout": cfg.timeout,
        "budget": budget,
        "prelude": "apps" if cfg.mode == "compat" else "none",
    }


def _judge(header: dict, out: bytes, problem: Problem, index: int, cfg: ExecConfig):
    status = header["status"]
    seconds = float(header.get("time", 0.0))
    error = header.get("error")
    if status == "ok":
        actual = header.get("return") if problem.kind == "call" else out.decode("utf-8", "replace")
        ok = outputs_match(
            actual, problem.outputs[index], kind=problem.kind, mode=cfg.mode, tol=cfg.float_tol
        )
        if ok:
            return "pass", seconds, None
        shown = repr(actual)
        return (
            "fail",
            seconds,
            "wrong answer: got " + (shown if len(shown) <= 120 else shown[:117] + "..."),
        )
    if status == "harness_error":
        raise RunError(f"the APPS sandbox could not run problem {problem.problem_id}: {error}")
    if status == "output_limit":
        return "fail", seconds, error
    if status in ("timeout", "runtime_error", "compile_error"):
        return status, seconds, error
    return "runtime_error", seconds, f"unknown sandbox status {status!r}"


def check_samples(problems: dict[str, Problem], ids: Iterable[str]) -> None:
    """UserError naming every unknown or unusable problem id among `ids`."""
    ids = list(dict.fromkeys(ids))
    unknown = [i for i in ids if i not in problems]
    if unknown:
        shown = ", ".join(unknown[:10]) + (
            f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
        )
        raise UserError(
            f"the generations name {len(unknown)} problem id(s) not in the problems: {shown}"
        )
    broken = [(i, problems[i].error) for i in ids if problems[i].error]
    if broken:
        pid, why = broken[0]
        more = f" (and {len(broken) - 1} more problems)" if len(broken) > 1 else ""
        raise UserError(f"problem {pid}: {why}{more}")


def evaluate_samples(
    problems: dict[str, Problem],
    samples: Sequence[tuple[str, str]],
    config: ExecConfig | None = None,
    progress: bool = True,
    *,
    pool: ExecPool | None = None,
    sample_indices: Sequence[int] | None = None,
    extract: bool = True,
    hide: Iterable[str] = (),
    done: dict[int, SampleResult] | None = None,
    on_result: Callable[[int, SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Run every (problem_id, completion) against its problem's tests; results in input order.

    `sample_indices` gives each row's sample number (default: its rank among rows of the same
    problem). With `extract`, the program is pulled out of the completion (see extract.py).
    `done` holds rows already evaluated (by row index), which are not run again; `on_result(j,
    result)` is called, from a worker thread, as row j finishes."""
    config = config or (pool.config if pool else ExecConfig())
    samples = [(str(pid), text) for pid, text in samples]
    check_samples(problems, (pid for pid, _ in samples))
    if sample_indices is None:
        seen: dict[str, int] = {}
        sample_indices = []
        for pid, _ in samples:
            sample_indices.append(seen.get(pid, 0))
            seen[pid] = seen.get(pid, 0) + 1
    codes = [
        extract_code(text, problems[pid].starter_code, problems[pid].fn_name) if extract else text
        for pid, text in samples
    ]
    own = pool is None
    pool = pool or ExecPool(config, hide)
    results: list[SampleResult | None] = [None] * len(samples)
    for j, res in (done or {}).items():
        results[j] = res
    todo = [j for j in range(len(samples)) if results[j] is None]
    try:
        bar = None
        if progress:
            from wprctl.console import make_progress

            bar = make_progress()
            bar.start()
            task = bar.add_task(
                "apps-eval", total=len(samples), completed=len(samples) - len(todo), info=""
            )
        n_pass = sum(r.all_passed for r in results if r is not None)

        def work(j: int) -> None:
            nonlocal n_pass
            pid = samples[j][0]
            results[j] = r = pool.run(problems[pid], codes[j], int(sample_indices[j]))
            if on_result is not None:
                on_result(j, r)
            if bar is not None:
                n_pass += r.all_passed
                bar.update(task, advance=1, info=f"all tests pass: {n_pass}")

        with ThreadPoolExecutor(max_workers=pool.size) as ex:
            futures = [ex.submit(work, j) for j in todo]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                for fut in futures:  # a sandbox that cannot start will not start for the rest
                    fut.cancel()
                raise
    finally:
        if progress and bar is not None:
            bar.stop()
        if own:
            pool.close()
    return [r for r in results if r is not None]


def execution_reward(
    problems: dict[str, Problem],
    samples: Sequence[tuple[str, str]],
    config: ExecConfig | None = None,
    *,
    pool: ExecPool | None = None,
) -> list[float]:
    """Per-sample rewards (see `sample_reward`) for PPO/DAR, in input order, no progress bar."""
    return [r.reward for r in evaluate_samples(problems, samples, config, False, pool=pool)]
