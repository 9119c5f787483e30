"""Reproducible speed and memory benchmarks: `python -m benchmarks.<name>` from the repo root."""
