"""The local `evaluate` module for ROUGE (loaded by path; see rouge.py)."""
