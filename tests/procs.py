"""Helpers for tests that start processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner, Result

from difftrain_dist.distrib.checkpoint import checkpoint_name, inspect_checkpoint
from difftrain_dist.launcher.app import app

RUN_MARK = "DIFFTRAIN_TEST_RUN"
"""Environment variable that tags every process of one test run (the driver and all the Ray
processes it starts inherit it), so that other runs on the machine are never counted."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Put back on exit the SIGINT, SIGTERM and SIGUSR1 handlers (a LocalSession in the test
    process installs its own)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "difftrain_dist", *args]


def cli_here(*args: str, cwd: Path | None = None) -> Result:
    """`difftrain-dist ARGS…` in this process (typer's CliRunner), for commands that start no run
    (export, sample, …): `.exit_code`, `.stdout`, `.stderr`."""
    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        return CliRunner().invoke(app, list(args))


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --nproc-per-node NPROC -m difftrain_dist ARGS…` on a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "difftrain_dist", *args]


def marked_env() -> tuple[dict[str, str], str]:
    """The environment for a run whose processes are found again by `marked_processes(mark)`."""
    mark = uuid.uuid4().hex
    return {**os.environ, RUN_MARK: mark, "PYTHONUNBUFFERED": "1"}, mark


def marked_processes(mark: str, width: int = 160) -> list[str]:
    """`pid name cmdline` of every live process started with `marked_env`'s mark (zombies aside),
    the command line cut at `width` characters."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(RUN_MARK) == mark:
                found.append(f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[:width]}")
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def assert_no_processes_left(mark: str, within_s: float = 20) -> None:
    """After the driver exited: within `within_s` no Ray process of its run (GCS, raylet,
    dashboard, workers) is left (a worker notices its raylet's end at its next poll)."""
    deadline = time.monotonic() + within_s
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes left behind by the run:\n" + "\n".join(left)


class Output:
    """Collects a running process's stream line by line (in a thread), so a test can wait for a line."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                assert proc.poll() is None or self._thread.is_alive(), f"run ended without printing {text!r}"
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {text!r} after {timeout} s")
                self._changed.wait(0.2)

    def text(self) -> str:
        """Everything read (call after the process ended: waits for the rest of the stream)."""
        self._thread.join(timeout=30)
        return "".join(self.lines)


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Poll until checkpoint `step` is complete; returns the manifest of its last rank."""
    folder = run_dir / checkpoint_name(step)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manifests = sorted(folder.glob("rank_*.json"), key=lambda p: int(p.stem.partition("_")[2]))
        if manifests and inspect_checkpoint(folder).valid:
            return json.loads(manifests[-1].read_text())
        assert proc.poll() is None, f"run ended before checkpoint {step}"
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint {step} after {timeout} s")
