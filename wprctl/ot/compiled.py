"""What the compiled (numba) CPU solvers share: compile options, threading layer, launching.

``wellposed_cpu`` and ``paper_cpu`` run one position per loop turn, the positions spread over a
thread pool. Their results do not depend on the thread count: a position's arithmetic is the
same whichever thread runs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import get_num_threads, set_num_threads, types
from numba.core import cgutils
from numba.extending import intrinsic

from wprctl.console import err_console, is_main_process
from wprctl.ot.threads import free_threads

if "NUMBA_THREADING_LAYER" not in os.environ:
    # numba would pick its OpenMP layer: a second OpenMP runtime beside PyTorch's, whose threads
    # spin after every launch on cores the caller's other threads need (measured in PPO: the
    # generation, forward and training phases ran 1.5x slower). The workqueue layer's threads
    # sleep when idle.
    numba.config.THREADING_LAYER = "workqueue"

# cache: compiled once per machine (~25 s for the wellposed solver), loaded from __pycache__
# after; nogil: PPO calls the solvers on a worker thread while its main thread runs Python
# (values, reward score), which would otherwise wait for the whole solve; no fastmath: the guards
# rely on inf and NaN behaving as IEEE says
OPTS: dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)
# for loops that sum: reassociation lets LLVM vectorize them; still no nnan or ninf, which would
# license it to drop the guards
SUM_OPTS: dict[str, Any] = dict(OPTS, fastmath={"reassoc", "contract"})
# for loops that evaluate ``vecmath``'s exp and log: fused multiply-adds (fewer operations, each
# rounded once), but no reassociation, which would undo their range reductions
VEC_OPTS: dict[str, Any] = dict(OPTS, fastmath={"contract"})

_CACHE_LINE = 64


@intrinsic
def prefetch_row(typingctx: Any, table: Any, row: Any) -> Any:
    """Ask the CPU to start loading row ``row`` of the C-contiguous 2D array ``table`` into its
    caches, every line of it, without waiting: issued one row ahead of a scan of scattered rows
    of a table larger than the cache (the kNN lists of the support tokens, 16 MB at V = 32k), the
    next row arrives while this one is read (1.6x faster on such a scan, measured)."""
    if not (isinstance(table, types.Array) and table.ndim == 2 and table.layout == "C"):
        return None
    if not isinstance(row, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        table_t, row_t = signature.args
        array = context.make_array(table_t)(context, builder, args[0])
        index = context.cast(builder, args[1], row_t, types.intp)
        zero = context.get_constant(types.intp, 0)
        item = cgutils.get_item_pointer(context, builder, table_t, array, [index, zero])
        start = builder.bitcast(item, ir.IntType(8).as_pointer())
        width = cgutils.unpack_tuple(builder, array.shape)[1]
        itemsize = context.get_constant(types.intp, table_t.dtype.bitwidth // 8)
        i32 = ir.IntType(32)
        # the intrinsic's name carries its pointer type: "ptr" where LLVM has opaque pointers
        name = "llvm.prefetch.p0" if str(start.type) == "ptr" else "llvm.prefetch.p0i8"
        fnty = ir.FunctionType(ir.VoidType(), [start.type, i32, i32, i32])
        fetch = cgutils.get_or_insert_function(builder.module, fnty, name)
        end = builder.mul(width, itemsize)
        step = context.get_constant(types.intp, _CACHE_LINE)
        with cgutils.for_range_slice(builder, zero, end, step) as (offset, _):
            # a read, kept in all cache levels, data
            address = builder.gep(start, [offset])
            builder.call(fetch, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(table, row), codegen


# one parallel launch at a time: the workqueue layer does not take concurrent ones
_LAUNCH = threading.Lock()

# A first call that has not returned after this many seconds is compiling (a cache load takes
# well under one): say so, rather than leave a command silent for half a minute.
NOTICE_AFTER = 3.0


_NOTICE_SAID = threading.Event()  # once per process, however many solvers compile


def _say_compiling() -> None:
    if not _NOTICE_SAID.is_set():
        _NOTICE_SAID.set()
        err_console.print(
            "[dim]Compiling the CPU optimal-transport solvers (first use on this machine, up to "
            "a minute; cached after) ...[/]"
        )


def _compile_notice(fn: Any) -> threading.Timer | None:
    """A timer that prints the compile notice, if ``fn`` has not been called in this process."""
    if getattr(fn, "signatures", None) or not is_main_process() or _NOTICE_SAID.is_set():
        return None
    timer = threading.Timer(NOTICE_AFTER, _say_compiling)
    timer.daemon = True
    timer.start()
    return timer


def chunk_bounds(n: int, threads: int, per_thread: int = 8) -> np.ndarray:
    """Bounds of the position chunks a parallel launch spreads over its threads: ``per_thread``
    chunks a thread (so a slow chunk does not hold the others up), at most one per position."""
    return np.linspace(0, n, max(1, min(n, per_thread * max(1, threads))) + 1).astype(np.int64)


def launch(parallel: Callable[..., Any], serial: Callable[..., Any], threads: int, n: int,
           *args: Any, long: bool = False) -> None:  # fmt: skip
    """``parallel(*args)`` on ``threads`` threads, or ``serial(*args)`` for one thread or one
    item (no thread pool is touched then).

    A short launch takes one thread while the calling thread shares the cores
    (``threads.free_threads``: PPO's worker beside its main thread). A ``long`` one takes them
    all anyway: numba splits the positions evenly over its threads at the start, so a launch on
    one thread stays on one after the main thread has finished (at the demo's sizes the
    ``wellposed`` solve took 113 ms on one thread, 72 ms on two from the start, and 86-90 ms
    when cut into waves that each take the threads free at their start: each wave waits for its
    slowest position)."""
    if not long:
        threads = free_threads(threads)
    fn = serial if threads <= 1 or n < 2 else parallel
    notice = _compile_notice(fn)
    try:
        if fn is serial:
            serial(*args)
            return
        with _LAUNCH:
            before = get_num_threads()
            set_num_threads(max(1, min(threads, before)))
            try:
                parallel(*args)
            finally:
                set_num_threads(before)
    finally:
        if notice is not None:
            notice.cancel()
