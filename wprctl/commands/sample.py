"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ('sample', "Draw the paper's evaluation subset from an inference file."),
)
