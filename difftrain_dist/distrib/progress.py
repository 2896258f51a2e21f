"""Live training progress on the driver: rank 0 pushes step metrics to a small Ray actor, the driver
polls it and renders a rich progress bar (or plain log lines when stderr is not a terminal)."""

from __future__ import annotations

import threading
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from difftrain_dist.distrib.session import format_metrics


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Mailbox between driver and workers: workers `push` metrics, the driver `drain`s them; the
    driver `request_stop`s, workers poll `stop_requested`."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.stop = False

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def push(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def drain(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


class ProgressDisplay:
    """Context manager that shows step / total, loss, samples/s and ETA while the job runs."""

    def __init__(self, board, max_steps: int, *, enabled: bool = True, poll_s: float = 0.5):
        self.board, self.max_steps, self.enabled, self.poll_s = board, max_steps, enabled, poll_s
        self.console = Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.last: dict[str, Any] | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        live = self.console.is_terminal
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
                for metrics in self._drain():
                    self.last = metrics
                    eta = int(metrics["eta_s"])
                    progress.update(task, completed=metrics["step"], loss=f"{metrics['loss']:.4f}",
                                    rate=f"{metrics['samples_per_s']:.2f}",
                                    eta=f"{eta // 60}:{eta % 60:02d}")
                    if not live:
                        self.console.print(format_metrics(metrics), highlight=False)
                if stopping:
                    return

    def _drain(self) -> list[dict[str, Any]]:
        try:
            return ray.get(self.board.drain.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return []
