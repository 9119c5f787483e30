"""Intra-op thread count for the OT solvers' many small tensor ops."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def intra_op_threads(n: int, enabled: bool = True) -> Iterator[None]:
    """Run the block with at most ``n`` intra-op threads (when ``enabled``), restoring the count
    after."""
    threads = torch.get_num_threads()
    change = enabled and threads > n
    if change:
        torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(threads)


_local = threading.local()


def compiled_threads() -> int:
    """Threads for the compiled (numba) solvers on this thread: its ``set_compiled_threads``
    count, else its intra-op thread count (``free_threads``: how many a launch takes now)."""
    return getattr(_local, "compiled", None) or torch.get_num_threads()


def set_compiled_threads(n: int | None, shared: Callable[[], bool] | None = None) -> None:
    """Let the compiled solvers called from this thread use ``n`` threads (None: the intra-op
    count), and one while ``shared()`` is true. For a thread that keeps one intra-op thread for
    PyTorch's sake (an OpenMP team per thread, see ``wprctl.stages.ppo``) but may run numba's own
    pool, whose threads sleep when idle, on the cores another thread leaves it. The compiled
    solvers give the same bits with any count, so a count that follows what the other threads
    are doing is safe."""
    _local.compiled = n
    _local.shared = shared


def free_threads(threads: int) -> int:
    """``threads``, or one while this thread's ``set_compiled_threads`` says the cores are shared:
    what a compiled launch (``compiled.launch``) takes at its start."""
    shared = getattr(_local, "shared", None)
    return 1 if shared is not None and shared() else threads


def backend_threads(backend: str, device: torch.device) -> int:
    """Threads for a solver's compiled CPU code, 0 for its tensor code.

    ``backend``: ``compiled`` (CPU tensors only), ``torch`` (any device), or ``auto`` (compiled on
    the CPU). The compiled code runs on ``compiled_threads()``: one parallel launch with one
    barrier, not thousands of small ops each with its own (see ``single_thread``)."""
    if backend not in ("auto", "compiled", "torch"):
        raise ValueError(f"backend must be auto, compiled or torch, not {backend!r}")
    if backend == "compiled" and device.type != "cpu":
        raise ValueError("the compiled solvers run on CPU tensors only")
    return compiled_threads() if backend != "torch" and device.type == "cpu" else 0


def single_thread(enabled: bool = True) -> AbstractContextManager[None]:
    """Run the block with one intra-op thread (when ``enabled``), restoring the count after.

    The iterative solvers issue thousands of ops on tensors of ~1e4-1e5 entries: extra threads
    gain little there, and on a busy CPU every op's barrier waits for a descheduled thread
    (measured on the 2-core benchmark machine under load: 30-100x slower with 2 threads).
    """
    return intra_op_threads(1, enabled)


def single_threaded_when(small: Callable[..., bool]) -> Callable[[F], F]:
    """Decorate a solver to run in ``single_thread`` when ``small(*args, **kwargs)`` is true."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with single_thread(small(*args, **kwargs)):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
