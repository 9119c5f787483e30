"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ('apps-eval', 'Run generated programs against APPS tests (sandboxed) and report pass@k.'),
)
