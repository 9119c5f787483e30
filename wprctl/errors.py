"""The two ways a command can fail, and their exit statuses (DESIGN.md: 2 bad input, 1 run failure).

Library code raises these; only `wprctl.cli.main` turns them into a message and an exit status,
so that no traceback reaches a user for a mistake they can fix.
"""

from __future__ import annotations


class WprctlError(Exception):
    exit_code = 1


class UserError(WprctlError):
    """Bad usage or bad input: the message names the file, key or line and what was expected."""

    exit_code = 2


class RunError(WprctlError):
    """A failure while running: the message says what failed and where the partial output is."""

    exit_code = 1


class NotYetImplemented(RunError):
    """A command whose stage is not built yet. It says so instead of pretending to work."""
