"""Generation rows made from the problems' own reference solutions, for demos and benchmarks.

With `weaken=True` some samples are deliberately damaged, deterministically from `seed`, so that
the metrics have something to separate: each sample is kept correct, or made to fail about half of
its tests (chosen by a hash of the test input), to print nothing, to raise at start, or to not
compile.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from wprctl.codeexec.problems import Problem

WEAKENINGS = ("correct", "partial", "wrong", "runtime_error", "compile_error")
_WEIGHTS = (0.35, 0.3, 0.15, 0.1, 0.1)

_PARTIAL_STDIN = """\
import sys as _s, zlib as _z
_data = _s.stdin.read()
if _z.crc32(_data.encode()) % 2 == 0:
    print("-1")
    raise SystemExit(0)
import io as _io
_s.stdin = _io.TextIOWrapper(_io.BytesIO(_data.encode()))
"""

_PARTIAL_CALL = """
import zlib as _z, functools as _f
def _weaken(fn, skip):
    @_f.wraps(fn)
    def inner(*args):
        if _z.crc32(repr(args[skip:]).encode()) % 2 == 0:
            return None
        return fn(*args)
    return inner
"""


def weaken_program(code: str, how: str, problem: Problem) -> str:
    if how == "correct":
        return code
    if how == "partial":
        if problem.kind == "stdin":
            return _PARTIAL_STDIN + code
        target = f"Solution.{problem.fn_name}" if problem.use_class else problem.fn_name
        skip = int(problem.use_class)  # `self` has a run-dependent repr
        return code + _PARTIAL_CALL + f"{target} = _weaken({target}, {skip})\n"
    if how == "wrong":
        return "print('')\n" if problem.kind == "stdin" else code + f"\n{_fn_stub(problem)}\n"
    if how == "runtime_error":
        return "raise RuntimeError('weakened sample')\n" + code
    if how == "compile_error":
        return code + "\ndef broken(:\n"
    raise ValueError(f"unknown weakening {how!r}")


def _fn_stub(problem: Problem) -> str:
    if problem.use_class:
        return f"Solution.{problem.fn_name} = lambda self, *a: None"
    return f"def {problem.fn_name}(*args):\n    return None"


def reference_generations(
    problems: dict[str, Problem] | list[Problem],
    n_per_problem: int,
    weaken: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows `{"id", "sample", "response", "weakening"}` (the apps-eval generations format), cycling
    through each problem's reference solutions; problems without one are skipped."""
    plist = list(problems.values()) if isinstance(problems, dict) else list(problems)
    rows: list[dict[str, Any]] = []
    for p in plist:
        if not p.solutions or p.error:
            continue
        for i in range(n_per_problem):
            code = p.solutions[i % len(p.solutions)]
            how = "correct"
            if weaken:
                rng = random.Random(zlib.crc32(f"{seed}:{p.problem_id}:{i}".encode()))
                how = rng.choices(WEAKENINGS, _WEIGHTS)[0]
            program = weaken_program(code, how, p)
            rows.append(
                {
                    "id": p.problem_id,
                    "sample": i,
                    "response": f"```python\n{program.rstrip()}\n```\n",
                    "weakening": how,
                }
            )
    return rows
