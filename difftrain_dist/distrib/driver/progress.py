"""Live training progress on the driver: rank 0 pushes step metrics to a small Ray actor, the driver
polls it and renders a rich progress bar (or plain log lines when stderr is not a terminal).

The workers' `difftrain_dist` log lines (resumed from, checkpoints skipped, …) travel the same
way and the driver prints them as its own, including a worker group Ray restarted after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from difftrain_dist.distrib.session import format_metrics

console = Console(stderr=True, highlight=False)
"""Where the driver speaks (stderr, like the CLI)."""


def say(text: str, out: Console = console) -> None:
    """Print one line as it is: no markup, no wrapping (the lines are grepped in logs)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Mailbox between driver and workers: workers `push` metrics and `note` log lines, the driver
    `drain`s them in order; the driver `request_stop`s, workers poll `stop_requested`."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.stop = False

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def push(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def note(self, line: dict[str, Any]) -> None:
        """A worker's log line: {"message", "rank"} and, at a worker group's start, "resume"."""
        self.items.append({"note": line})

    def drain(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


RESUME_EXTRA = "resume"
"""`extra` key of the log record with which rank 0 says where a worker group starts:
{"checkpoint": name or None, "step": int}."""


class BoardLogHandler(logging.Handler):
    """On a Ray worker: sends the `difftrain_dist` logger's warnings (and its records that carry
    RESUME_EXTRA) to the board, for the driver to print."""

    def __init__(self, board, rank: int):
        super().__init__(logging.INFO)
        self.board, self.rank = board, rank

    def emit(self, record: logging.LogRecord) -> None:
        resume = getattr(record, RESUME_EXTRA, None)
        if record.levelno < logging.WARNING and resume is None:
            return
        line: dict[str, Any] = {"message": record.getMessage(), "rank": self.rank}
        if resume is not None:
            line["resume"] = resume
        try:
            self.board.note.remote(line)
        except Exception:  # the driver is gone: nobody to tell
            self.handleError(record)


@contextlib.contextmanager
def logs_to_board(board, rank: int) -> Iterator[None]:
    """While inside, this worker's `difftrain_dist` log records go to the driver through the
    board instead of the worker's stderr (where Ray would print them with its own prefix)."""
    logger = logging.getLogger("difftrain_dist")
    handler = BoardLogHandler(board, rank)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def note_text(line: dict[str, Any], starts: int) -> str | None:
    """What the driver prints for a worker's log line; `starts`: worker group starts seen so far,
    this one included when the line carries "resume". None: nothing to say."""
    resume = line.get("resume")
    if resume is None:
        return line["message"] if line["rank"] == 0 else f"rank {line['rank']}: {line['message']}"
    if starts <= 1:
        return line["message"] if resume["checkpoint"] else None  # a fresh start is no news
    where = (f"resumed from {resume['checkpoint']} (step {resume['step']})" if resume["checkpoint"]
             else "started again from step 0 (no checkpoint saved yet)")
    return f"worker group restarted after a failure (attempt {starts}): {where}"


class ProgressDisplay:
    """Context manager that shows step / total, loss, samples/s and ETA while the job runs
    (`enabled`), and the workers' log lines in any case."""

    def __init__(self, board, max_steps: int, *, enabled: bool = True, poll_s: float = 0.5):
        self.board, self.max_steps, self.enabled, self.poll_s = board, max_steps, enabled, poll_s
        self.console = console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.last: dict[str, Any] | None = None
        self.starts = 0
        """Worker group starts seen (1 + the restarts after failures)."""

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        live = self.enabled and self.console.is_terminal
        progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("eta {task.fields[eta]}"), TimeElapsedColumn(),
            console=self.console, disable=not live,
        )
        with progress:
            task = progress.add_task("train", total=self.max_steps, loss="-", rate="-", eta="-")
            while True:
                stopping = self._stop.wait(self.poll_s)
                for item in self._drain():
                    if "note" in item:
                        self._note(item["note"], progress.console)
                        continue
                    self.last = item
                    eta = int(item["eta_s"])
                    progress.update(task, completed=item["step"], loss=f"{item['loss']:.4f}",
                                    rate=f"{item['samples_per_s']:.2f}",
                                    eta=f"{eta // 60}:{eta % 60:02d}")
                    if self.enabled and not live:
                        say(format_metrics(item), progress.console)
                if stopping:
                    return

    def _note(self, line: dict[str, Any], out: Console) -> None:
        if "resume" in line:
            self.starts += 1
        text = note_text(line, self.starts)
        if text is not None:
            say(text, out)

    def _drain(self) -> list[dict[str, Any]]:
        try:
            return ray.get(self.board.drain.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return []
