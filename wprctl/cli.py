"""The `wprctl` command line. Commands live in `wprctl.commands.*`; this file only assembles them
and turns wprctl's errors into messages and exit statuses (2 bad input, 1 run failure)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import typer

from wprctl import __version__
from wprctl.commands import COMMAND_MODULES
from wprctl.errors import StopRequested, WprctlError

app = typer.Typer(
    name="wprctl",
    help=(
        "RLHF with Wasserstein Policy Regularization: SFT, reward model, PPO with pluggable "
        "regularizers (WPR, KL, f-divergences), DAR, inference, APPS execution and judging, "
        "all driven by one project manifest (wprctl.toml)."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wprctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """wprctl: the WPR paper's RLHF pipeline in one tool."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"wprctl.commands.{_name}").register(app)

# The command list of `wprctl --help` shows a docstring's first paragraph with its line breaks
# (typer joins the lines in its other markup modes only); joined, each summary reads as a sentence.
for _info in app.registered_commands:
    _doc = _info.help or (_info.callback.__doc__ if _info.callback else None)
    if _info.short_help is None and _doc:
        _info.short_help = " ".join(inspect.cleandoc(_doc).split("\n\n")[0].split())


# libgomp (PyTorch's OpenMP on Linux) keeps an idle team thread spinning for GOMP_SPINCOUNT
# iterations after each parallel region, 300000 by default: milliseconds of a core. PPO's
# regularizer worker starts right after the forward passes, beside the main thread's last parallel
# region, and lost that core to the spin (measured on the demo, 2 cores: the worker's 10 ms of CPU
# took 17 ms; with 20000 it takes 11 ms, and the main thread's own phases, whose parallel ops come
# microseconds apart, run as fast as before). Set before PyTorch is imported (libgomp reads it
# once); a value in the environment is kept.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "20000"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a WprctlError becomes a one-paragraph message and its exit code.

    Without ``argv`` this is the program (the console script, ``python -m wprctl``, a launcher's
    rank), whose process ends here; a caller passing ``argv`` (tests, a notebook) keeps its
    process and the process group a stage joined, since DeepSpeed caches the group and cannot
    join a new one after it is destroyed.
    """
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from rich.markup import escape

    from wprctl import launch
    from wprctl.console import err_console

    launch.CURRENT_ARGV = list(argv) if argv is not None else sys.argv[1:]
    try:
        # Without standalone mode, typer returns (not raises) the code of an Exit, and turns
        # Ctrl-C into Exit(130): a returned code must reach the shell, or `&&` chains go on
        returned = app(args=argv, standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
        if code == 130:
            err_console.print("interrupted")
    except WprctlError as exc:
        if exc.quiet:  # a rank's message, said once by the command that launched the ranks
            pass
        elif isinstance(exc, StopRequested):  # asked for, and nothing is lost: not an error
            err_console.print(escape(str(exc)), soft_wrap=True)
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors carry their own exit code (2)
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if argv is None:
        leave_process_group()
    if code:
        sys.exit(code)


def leave_process_group() -> None:
    """Destroy the process group, if a stage joined one, while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads can still hold work whose tensors reach
    back into Python; tearing them down then aborts the process ("terminate called without an
    active exception", SIGABRT), now and then: a finished two-rank ZeRO-3 run died with -6 in CI.
    Only on the clean exits (finished, bad input, Exit): after an unexpected error a peer may be
    inside a collective, and the launcher ends the other ranks anyway.
    """
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has none
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _click_exceptions() -> tuple[type[Exception], ...]:
    # Recent typer versions vendor their own copy of click; usage errors may come from either.
    import click

    kinds: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        kinds.append(TyperClickException)
    except ImportError:
        pass
    return tuple(kinds)
