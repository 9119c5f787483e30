"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ("infer", "Batch generation with reward scores."),
)
