"""Placeholder for commands whose stage is not built yet: they say so and exit 1."""

from __future__ import annotations

from collections.abc import Callable

import typer

from wprctl.errors import NotYetImplemented


def not_yet(app: typer.Typer, name: str, help_text: str) -> None:
    def command(
        ctx: typer.Context,
    ) -> None:
        raise NotYetImplemented(f"`wprctl {name}` is not implemented yet.")

    command.__doc__ = help_text + "\n\n(Not implemented yet: exits with status 1.)"
    app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        command
    )


def stub_module(*commands: tuple[str, str]) -> Callable[[typer.Typer], None]:
    def register(app: typer.Typer) -> None:
        for name, help_text in commands:
            not_yet(app, name, help_text)

    return register
