"""Execution settings, mapped from the manifest's `[apps]` section."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

Mode = Literal["strict", "compat"]
SandboxKind = Literal["auto", "namespaces", "rlimits"]


@dataclass(frozen=True)
class ExecConfig:
    timeout: float = 4.0  # wall-clock seconds per test
    problem_budget: float = 60.0  # wall-clock seconds for all tests of one sample
    workers: int | None = None  # sandboxes run in parallel; default: the number of cores
    mode: Mode = "strict"
    memory_mb: int = 1024  # address space a program may add on top of the interpreter
    sandbox: SandboxKind = "auto"
    nproc: int = 32  # processes + threads per program (RLIMIT_NPROC, per sandbox uid)
    nofile: int = 64
    fsize_mb: int = 16  # largest file a program may write
    stack_mb: int = 256  # deep recursion with a raised recursion limit needs a big C stack
    tmp_mb: int = 256  # the sandbox's private /tmp (holds the working directories)
    output_limit_mb: float = 4.0  # captured stdout cap (at least 2x the expected output)
    float_tol: float = 1e-6  # strict mode: absolute or relative error allowed between numbers

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "compat"):
            raise ValueError(f"mode must be 'strict' or 'compat', got {self.mode!r}")
        if self.sandbox not in ("auto", "namespaces", "rlimits"):
            raise ValueError(f"sandbox must be auto, namespaces or rlimits, got {self.sandbox!r}")
        for name in ("timeout", "problem_budget"):
            value = getattr(self, name)
            if not 0 < value < math.inf:  # also false for NaN
                raise ValueError(
                    f"{name} must be a positive, finite number of seconds, got {value}"
                )

    @property
    def n_workers(self) -> int:
        return max(1, self.workers or len(os.sched_getaffinity(0)) or 1)

    @classmethod
    def from_apps(cls, apps: Any, **overrides: Any) -> ExecConfig:
        """From a manifest `AppsConfig` (or anything with the same attributes), plus overrides."""
        names = {f.name for f in fields(cls)}
        values = {n: getattr(apps, n) for n in names if hasattr(apps, n)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> ExecConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
