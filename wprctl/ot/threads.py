"""Intra-op thread count for the OT solvers' many small tensor ops."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one intra-op thread (when ``enabled``), restoring the count after.

    The iterative solvers issue thousands of ops on tensors of ~1e4-1e5 entries: extra threads
    gain little there, and on a busy CPU every op's barrier waits for a descheduled thread
    (measured on the 2-core benchmark machine under load: 30-100x slower with 2 threads).
    """
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled and threads > 1:
            torch.set_num_threads(threads)


def single_threaded_when(small: Callable[..., bool]) -> Callable[[F], F]:
    """Decorate a solver to run in ``single_thread`` when ``small(*args, **kwargs)`` is true."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with single_thread(small(*args, **kwargs)):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
