"""Live training progress on the driver: rank 0 pushes step metrics to a mailbox (in its own
actor on an embedded cluster, a small Ray actor on a Ray Train run), the driver polls it and
renders a rich progress bar (or plain log lines when stderr is not a terminal).

The workers' `difftrain_dist` log lines (resumed from, checkpoints skipped, …) travel the same
way and the driver prints them as its own, including a worker group restarted after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from difftrain_dist.distrib.session import STOP_SIGNALS, format_metrics

console = Console(stderr=True, highlight=False)
"""Where the driver speaks (stderr, like the CLI)."""


def say(text: str, out: Console = console) -> None:
    """Print one line as it is: no markup, no wrapping (the lines are grepped in logs)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


class Mailbox:
    """Between driver and workers: workers `push` metrics and `note` log lines, the driver
    `drain`s them in order; the driver `request_stop`s, workers poll `stop_requested`.
    Thread-safe (a rank actor's loop and the driver's calls run on different threads)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.stop = False
        self._lock = threading.Lock()

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def push(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            self.items.append(metrics)

    def note(self, line: dict[str, Any]) -> None:
        """A worker's log line: {"message", "rank"} and, at a worker group's start, "resume"."""
        with self._lock:
            self.items.append({"note": line})

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            items, self.items = self.items, []
        return items


ProgressBoard = ray.remote(num_cpus=0)(Mailbox)
"""A Mailbox as a Ray actor, for Ray Train runs: the workers reach it from any node."""


RESUME_EXTRA = "resume"
"""`extra` key of the log record with which rank 0 says where a worker group starts:
{"checkpoint": name or None, "step": int}."""


class BoardLogHandler(logging.Handler):
    """On a Ray worker: sends the `difftrain_dist` logger's warnings (and its records that carry
    RESUME_EXTRA) to the driver through `note` (a Mailbox's, or a ProgressBoard's `note.remote`)."""

    def __init__(self, note: Callable[[dict[str, Any]], Any], rank: int):
        super().__init__(logging.INFO)
        self.send, self.rank = note, rank

    def emit(self, record: logging.LogRecord) -> None:
        resume = getattr(record, RESUME_EXTRA, None)
        if record.levelno < logging.WARNING and resume is None:
            return
        line: dict[str, Any] = {"message": record.getMessage(), "rank": self.rank}
        if resume is not None:
            line["resume"] = resume
        try:
            self.send(line)
        except Exception:  # the driver is gone: nobody to tell
            self.handleError(record)


@contextlib.contextmanager
def logs_to_board(note: Callable[[dict[str, Any]], Any], rank: int) -> Iterator[None]:
    """While inside, this worker's `difftrain_dist` log records go to the driver through `note`
    instead of the worker's stderr (where Ray would print them with its own prefix)."""
    logger = logging.getLogger("difftrain_dist")
    handler = BoardLogHandler(note, rank)
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

    def __init__(self, drain: Callable[[], list[dict[str, Any]]], max_steps: int, *, enabled: bool = True,
                 poll_s: float = 0.5):
        self.drain, self.max_steps, self.enabled, self.poll_s = drain, max_steps, enabled, poll_s
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
                for item in self.drain():
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


def board_drain(board) -> Callable[[], list[dict[str, Any]]]:
    """ProgressDisplay's source for a ProgressBoard actor (nothing while it cannot be reached)."""

    def drain() -> list[dict[str, Any]]:
        try:
            return ray.get(board.drain.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return []

    return drain


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], Any]) -> Iterator[list[int]]:
    """While inside, SIGTERM/SIGUSR1/SIGINT to the driver call `request_stop` (the workers stop
    after their current step, with a checkpoint); a second signal raises KeyboardInterrupt at
    once. Yields the signals seen. Main thread only."""
    seen: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if seen:
            print(f"received {name} again: aborting at once", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(f"second {name}")
        seen.append(signum)
        print(f"received {name}: stopping after the current step with a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)
        request_stop()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
