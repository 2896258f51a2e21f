"""Helpers shared by the CLI verbs: user-facing errors and console output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console(stderr=True, highlight=False)
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL): run again to continue."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn ValueError (bad recipe, bad file, bad checkpoint) into a red message and exit status 2."""
    try:
        yield
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(EXIT_USAGE) from None
