"""A plain (non-editable) install carries the ready manifests and the judge templates."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_pipelines_and_judge_templates(tmp_path: Path) -> None:
    # a copy of the tree (links kept), so the in-tree build leaves no build/ behind
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, symlinks=True,
        ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"),
    )  # fmt: skip
    # offline: the build backend (setuptools, a torch dependency) is taken from this environment
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("wprctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in [*ROOT.glob("pipelines/*.toml"), *ROOT.glob("templates/judge/*.toml")]:
        packaged = f"wprctl/assets/{source.relative_to(ROOT).as_posix()}"
        assert packaged in names, f"{source} is missing from the wheel"
        assert zipfile.ZipFile(wheel).read(packaged) == source.read_bytes()
