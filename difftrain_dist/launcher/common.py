"""Helpers shared by the CLI verbs: user-facing errors and console output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)
"""Messages are not wrapped at the terminal width: logs and the dashboard read whole lines."""
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint (EX_TEMPFAIL): run again to continue."""
EXIT_INTERRUPTED = 130
"""Aborted at once by a second stop signal (or Ctrl+C before training began): 128 + SIGINT, as
shells report a process killed by Ctrl+C."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn ValueError (bad recipe, bad file, bad checkpoint) into a red message and exit status 2."""
    try:
        yield
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(EXIT_USAGE) from None


@contextlib.contextmanager
def training_errors() -> Iterator[None]:
    """A run that failed inside its workers: one line naming the worker's error, exit 1 (the
    workers' tracebacks are in the log above)."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        from difftrain_dist.distrib.driver.record import failure_line

        console.print(f"[red]error:[/red] training failed: {escape(failure_line(err))}")
        raise typer.Exit(1) from None


@contextlib.contextmanager
def interruptions(hint: str) -> Iterator[None]:
    """Turn KeyboardInterrupt (a second Ctrl+C or stop signal, or Ctrl+C while starting) into one
    line, `interrupted: <hint>`, and exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] {hint}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
