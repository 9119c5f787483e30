"""An `apps-eval` run's finished samples, appended as they finish, so an interrupted run resumes.

`<out>.partial.jsonl` holds one line per finished (problem, sample): a fingerprint of everything
its verdicts depend on (the completion, the problem's tests, the execution settings) and the
result. A rerun of the same command takes the results whose fingerprint still matches and runs
the rest; a changed completion, test or setting is run again. The file goes once `<out>` is
written. A line torn by a kill is skipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict
from pathlib import Path

from wprctl.codeexec.config import ExecConfig
from wprctl.codeexec.executor import SampleResult
from wprctl.codeexec.problems import Problem
from wprctl.errors import UserError

# Settings that cannot change a verdict; a rerun with more workers still reuses results.
_NOT_VERDICT = ("workers",)


def fingerprint(problem: Problem, sample: int, completion: str, config: ExecConfig) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_VERDICT}
    tests = [problem.inputs, problem.outputs, problem.fn_name, problem.starter_code]
    blob = json.dumps([settings, problem.problem_id, sample, completion, tests], default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class PartialResults:
    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".partial.jsonl")
        self._lock = threading.Lock()

    def load(self) -> dict[str, SampleResult]:
        found: dict[str, SampleResult] = {}
        if not self.path.exists():
            return found
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot read an interrupted run's results ({exc.strerror or exc}); "
                "fix its permissions, or delete it to evaluate every sample again"
            ) from None
        # Bytes, not text: a kill can tear a multi-byte character, and only that line is lost.
        for line in data.splitlines():
            try:
                entry = json.loads(line)
                found[entry["key"]] = SampleResult.from_dict(entry["result"])
            except (ValueError, KeyError, TypeError):
                continue
        return found

    def append(self, key: str, result: SampleResult) -> None:
        """Called from the worker threads as each sample finishes."""
        line = json.dumps({"key": key, "result": result.to_dict()}) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
