"""Local `evaluate` modules: `evaluate.load(METRIC_PATH)` works offline."""

from pathlib import Path

METRIC_PATH = str(Path(__file__).with_name("apps_pass_at_k.py"))
