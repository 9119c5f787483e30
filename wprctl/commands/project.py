"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ('init', 'Write DIR/wprctl.toml from a template (demo, tldr, hh-rlhf, apps).'),
    ('status', 'Show which stages are done and where their outputs are.'),
    ('run', "Run the manifest's stages in order."),
    ('quickstart', 'The embedded demo: init demo + run + report.'),
)
