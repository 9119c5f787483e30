"""One rich console for the whole tool, progress bars with ETA, and warning hygiene."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# Reports go to stdout from rank 0 only (N ranks would print every line N times); errors and
# warnings, on stderr, from every rank, since a rank can fail alone.
console = Console(stderr=False, highlight=False, quiet=not is_main_process())
err_console = Console(stderr=True, highlight=False)


def make_progress(transient: bool = False) -> Progress:
    """A progress bar with ETA; silent on non-zero ranks so N processes do not draw N bars."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not is_main_process(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)


def print_table(table: Any) -> None:
    """A table at its natural width when the output is a file or a pipe (a log, CI), where rich's
    default 80 columns would cut cells ("100.…", "samp…"); a terminal shrinks it as usual."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update(width=10_000), table).maximum
    # print() caps a width at the console's own: a console of the table's width does the work
    Console(file=console.file, highlight=False, width=max(console.width, natural)).print(table)


def short_metrics(metrics: dict[str, float], n: int = 4) -> str:
    """The first ``n`` metrics as "name value" for a summary table's cell."""

    def number(v: float) -> str:
        # whole numbers (steps, counts) in full: 6000 steps read badly as 6e+03
        if isinstance(v, int | float) and float(v).is_integer() and abs(v) < 1e12:
            return str(int(v))
        return f"{v:.3g}"

    return ", ".join(f"{k.split('/')[-1]} {number(v)}" for k, v in list(metrics.items())[:n])


_QUIET_DONE = False


def quiet_library_warnings() -> None:
    """Silence library chatter a user cannot act on; keep everything else visible.

    Each filter names one message we have seen and judged harmless on every code path of wprctl.
    """
    global _QUIET_DONE
    if _QUIET_DONE:
        return
    _QUIET_DONE = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault(
        "DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "") or _default_ds_accelerator()
    )
    if not os.environ["DS_ACCELERATOR"]:
        del os.environ["DS_ACCELERATOR"]
    for pattern in (
        r".*torch.utils._pytree._register_pytree_node.*",
        r".*TypedStorage is deprecated.*",
        r".*`torch_dtype` is deprecated.*",
        r".*The attention mask and the pad token id were not set.*",
        r".*Setting `pad_token_id` to `eos_token_id`.*",
        r".*torch.cpu.amp.autocast.*",
        r".*is_torch_tpu_available.*",
        # DeepSpeed's ZeRO-3 gradient reduction and its CPU-offload parameter gathering call the
        # old names; the warnings are about them
        r".*`torch.distributed.reduce_scatter_tensor` is deprecated.*",
        r".*`torch.distributed.all_gather_into_tensor` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed.elastic", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # per-file load/save bars on tiny models
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


# Packages whose presence makes DeepSpeed pick a non-CUDA accelerator (its own detection order).
_DS_ACCELERATOR_PACKAGES = (
    "torch_npu",
    "torch_sdaa",
    "habana_frameworks",
    "torch_mlu",
    "torch_supa",
    "torch_xmlir",
)


def _default_ds_accelerator() -> str:
    """DS_ACCELERATOR's value: cpu where DeepSpeed has no accelerator to use, else empty (it
    detects one itself).

    DeepSpeed guesses the accelerator and logs a warning on every import when there is none;
    deciding here keeps the console clean and makes the CPU choice explicit. Anything else it
    knows is left to its own detection, which a forced "cpu" would override."""
    import importlib.util

    if any(importlib.util.find_spec(name) for name in _DS_ACCELERATOR_PACKAGES):
        return ""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return ""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available() or (xpu is not None and xpu.is_available()):
        return ""
    return "" if mps is not None and mps.is_available() else "cpu"
