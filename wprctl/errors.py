"""The ways a command can end early, and their exit statuses (DESIGN.md: 2 bad input, 1 run
failure; 128 + signal for a run stopped on request).

Library code raises these; only `wprctl.cli.main` turns them into a message and an exit status,
so that no traceback reaches a user for a mistake they can fix.
"""

from __future__ import annotations

import signal


class WprctlError(Exception):
    exit_code = 1
    # Set on a rank of a multi-process run: it hands its message to the parent, which prints each
    # distinct message once instead of once per rank.
    quiet = False


class UserError(WprctlError):
    """Bad usage or bad input: the message names the file, key or line and what was expected."""

    exit_code = 2


class RunError(WprctlError):
    """A failure while running: the message says what failed and where the partial output is."""

    exit_code = 1


class NotYetImplemented(RunError):
    """A command whose stage is not built yet. It says so instead of pretending to work."""


class StopRequested(WprctlError):
    """A run stopped on request after saving a checkpoint; the exit status is 128 + signal."""

    def __init__(self, signum: int, step: int | None = None, message: str | None = None) -> None:
        where = f" after step {step}, with a checkpoint" if step is not None else ""
        super().__init__(message or f"stopped on {signal_name(signum)}{where}")
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
