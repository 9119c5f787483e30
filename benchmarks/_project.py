"""Helpers for the benchmarks: a throwaway demo project and reading its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def wprctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "wprctl", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    if check and proc.returncode != 0:
        raise SystemExit(
            f"wprctl {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc


def demo_project(root: Path | None = None) -> Path:
    root = root or Path(tempfile.mkdtemp(prefix="wprctl-bench-"))
    if not (root / "wprctl.toml").exists():
        wprctl("init", str(root), "--template", "demo")
    return root / "wprctl.toml"


def metrics(manifest: Path, name: str) -> list[dict]:
    path = manifest.parent / "runs" / name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
