"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ('judge', 'Pairwise LLM judging of two inference files.'),
)
