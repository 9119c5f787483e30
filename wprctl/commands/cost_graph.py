"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ("cost-graph", "Nearest tokens and costs in the WPR cost graph."),
)
