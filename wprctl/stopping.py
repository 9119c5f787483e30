"""Stopping a training run cleanly: Ctrl-C, SIGTERM (a scheduler's preemption notice) or SIGHUP
(the terminal closed, the ssh session dropped).

The first SIGINT, SIGTERM or SIGHUP only asks. The training loop finishes the step it is in, saves
a checkpoint there, and the command exits 128 + the signal (130, 143, 129), so `--resume` loses
nothing. A second Ctrl-C stops at once, as Ctrl-C did before. A repeated SIGTERM or SIGHUP only
repeats the request: DeepSpeed's launcher passes a SIGTERM on to every rank and sends SIGKILL
30 s later, and a cluster scheduler does the same with its own grace period.

Under DeepSpeed every rank takes part in the checkpoint (ZeRO shards are saved by their owners),
so the ranks must stop at the same step although the signal reaches them at different moments:
they agree once per step with a one-number all-reduce.

A SIGHUP that was ignored when wprctl started stays ignored: `nohup wprctl ...` means "keep
running when the terminal closes". (SIGINT is taken even where a shell started wprctl ignoring
it, as a script's background job: only an explicit `kill -INT` reaches such a job.)
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Protocol

from wprctl.errors import StopRequested, signal_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Handler = Callable[[int, FrameType | None], Any]


def take_signals(handler: Handler) -> dict[int, Any]:
    """``handler`` for each stop signal, except a SIGHUP ignored under `nohup`; returns the
    handlers it replaced, for ``restore_signals``. Main thread only (Python's rule)."""
    return {
        sig: signal.signal(sig, handler)
        for sig in STOP_SIGNALS
        if not (sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN)
    }


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class GracefulStop:
    """Context manager for a training loop: ``requested()`` is the signal to stop on, or 0.

    Outside the ``with`` block, and in threads other than the main one (where Python cannot set
    handlers), signals behave as they did before.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = take_signals(self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        restore_signals(self._previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum:
            return
        self.signum = signum
        if self.announce:
            # plain stderr: a rich console may be in the middle of drawing the progress bar
            again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
            sys.stderr.write(
                f"\n{signal_name(signum)}: stopping after this step, with a checkpoint{again}\n"
            )
            sys.stderr.flush()

    def requested(self) -> int:
        """The signal any rank received (the same answer on every rank), or 0. Collective."""
        from wprctl.engine import all_reduce_max

        return int(all_reduce_max([float(self.signum)])[0])


def stop_if_requested(
    stop: GracefulStop, step: int, saved: bool, save: Callable[[int], None]
) -> None:
    """At a step boundary: if a stop was asked for, checkpoint at ``step`` (unless ``saved``
    already did) and raise StopRequested. Every rank must call it at every step."""
    signum = stop.requested()
    if signum:
        if not saved:
            save(step)
        raise StopRequested(signum, step)


class Schedule(Protocol):
    eval_every: int
    save_every: int


def end_of_step(
    step: int,
    total: int,
    schedule: Schedule,
    log_eval: Callable[[int], None],
    save: Callable[[int], None],
    stop: GracefulStop,
) -> None:
    """What a training loop does after step ``step``: the held-out evaluation and the checkpoint
    when they are due, then a stop if one was asked for. Nothing after the last step, which the
    caller finishes (final evaluation, export)."""
    if step == total:
        return
    if step % schedule.eval_every == 0:
        log_eval(step)
    saved = step % schedule.save_every == 0
    if saved:
        save(step)
    stop_if_requested(stop, step, saved, save)
