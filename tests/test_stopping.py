"""The stop request's signal handling, in this process: the first Ctrl-C asks, the second stops
at once, SIGTERMs only ask, and the handlers before are back afterwards."""

from __future__ import annotations

import signal

import pytest

from wprctl.errors import StopRequested
from wprctl.stopping import GracefulStop, restore_signals, stop_if_requested, take_signals


def test_first_ctrl_c_asks_and_the_second_interrupts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(announce=False) as stop:
        assert stop.requested() == 0
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the loop finishes its step
        assert stop.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_only_asks_even_when_repeated_and_keeps_the_first_signal() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(announce=False) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # a launcher's SIGINT after the SIGTERM: still asks
        assert stop.requested() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_requested_stop_saves_once_and_exits_128_plus_the_signal() -> None:
    saved: list[int] = []
    with GracefulStop(announce=False) as stop:
        stop_if_requested(stop, 3, False, saved.append)  # nothing asked: carry on
        assert saved == []
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(StopRequested) as info:
            stop_if_requested(stop, 4, False, saved.append)
        assert saved == [4] and info.value.exit_code == 143 and info.value.step == 4
        with pytest.raises(StopRequested):
            stop_if_requested(stop, 5, True, saved.append)  # the step's own checkpoint: no second
        assert saved == [4]
    assert "after step 5, with a checkpoint" in str(StopRequested(signal.SIGINT, 5))


def test_a_closed_terminal_asks_too_but_not_under_nohup() -> None:
    """SIGHUP (terminal closed, ssh dropped) asks like SIGTERM; under `nohup` (SIGHUP ignored)
    the run goes on: neither the training loop nor the multi-process relaunch takes it over.
    An ignored SIGINT (a script's background job) is still taken: `kill -INT` asks."""
    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # whether or not pytest runs under nohup
        with GracefulStop(announce=False) as stop:
            signal.raise_signal(signal.SIGHUP)
            assert stop.requested() == signal.SIGHUP
        with pytest.raises(StopRequested) as info:
            stop_if_requested(stop, 2, True, lambda step: None)
        assert info.value.exit_code == 129
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
        with GracefulStop(announce=False) as stop:
            signal.raise_signal(signal.SIGHUP)
            assert stop.requested() == 0
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        taken = take_signals(lambda signum, frame: None)  # what `launch.relaunch` installs
        restore_signals(taken)
        signal.signal(signal.SIGINT, sigint)
        assert signal.SIGHUP not in taken and {signal.SIGINT, signal.SIGTERM} <= taken.keys()
    finally:
        signal.signal(signal.SIGHUP, before)
