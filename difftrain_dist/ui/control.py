"""Starting, stopping and resuming runs from the dashboard, and its table of the runs it started.

A run the dashboard starts on this machine is a `difftrain-dist train` (or `resume`) process in a
session of its own, writing to `RUN/console.log`: it outlives the dashboard, and a dashboard
started later finds it running by its driver lock. A run submitted to a Ray cluster is a Ray job;
the table (`RUNS/.difftrain-ui/started.sqlite`) keeps its id and address, the one thing the run
folder cannot tell. Stop is the preemption path: SIGTERM to the driver (or Ray's stop_job, which
sends it SIGTERM), which saves a checkpoint and exits with status 75.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from difftrain_dist.distrib.driver.record import lock_holder, read_driver_record
from difftrain_dist.ui.runs import CONSOLE_LOG

STATE_DIR = ".difftrain-ui"
"""Under the runs folder: the table of started runs and the recipes pasted into the dashboard."""


class Registry:
    """`RUNS/.difftrain-ui/started.sqlite`: one row per run the dashboard started (the latest
    start): kind "local" (pid) or "ray" (job_id, address), and when."""

    def __init__(self, runs_dir: Path):
        self.folder = Path(runs_dir) / STATE_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "started.sqlite"
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS started (name TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                       "pid INTEGER, job_id TEXT, address TEXT, started REAL NOT NULL, command TEXT)")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def record(self, name: str, kind: str, *, pid: int | None = None, job_id: str | None = None,
               address: str | None = None, command: str = "") -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO started VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, kind, pid, job_id, address, time.time(), command))

    def get(self, name: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM started WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def all(self) -> dict[str, dict[str, Any]]:
        with self._db() as db:
            return {row["name"]: dict(row) for row in db.execute("SELECT * FROM started")}


_children: list[subprocess.Popen] = []
"""Processes this dashboard started, polled so that finished ones do not linger as zombies."""


def reap_children() -> None:
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)


def spawn_driver(run_dir: Path, args: list[str], cwd: Path | None = None) -> int:
    """Start `python -m difftrain_dist ARGS --no-progress` in a session of its own (it survives the
    dashboard and does not hear its terminal), output appended to `run_dir/console.log`.
    Returns its pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "difftrain_dist", *args, "--no-progress"]
    with open(run_dir / CONSOLE_LOG, "ab") as log:
        log.write(f"\n$ difftrain-dist {' '.join(args)}  # started by the dashboard, {time.ctime()}\n".encode())
        log.flush()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=cwd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _children.append(child)
    return child.pid


def stop_local(run_dir: Path) -> int:
    """SIGTERM to the process holding the run's driver lock (the lock names it, whatever
    driver.json says), when the driver runs on this machine; returns its pid.

    Raises:
        ValueError: nothing trains the run, or its driver runs on another machine.
    """
    pid = lock_holder(run_dir)
    if pid is None:
        raise ValueError(f"run {run_dir.name} is not running")
    record = read_driver_record(run_dir)
    if record is not None and record.host != socket.gethostname():
        raise ValueError(f"run {run_dir.name} is driven from {record.host}, not from this machine: stop it there "
                         f"(SIGTERM to pid {record.pid}) or through its Ray job")
    os.kill(pid, signal.SIGTERM)
    return pid
