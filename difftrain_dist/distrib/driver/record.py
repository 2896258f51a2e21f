"""Which process drives a run, and how its last session ended: `RUN/driver.json` + `RUN/driver.lock`.

The driver (`train`, `resume`, a Ray Jobs entrypoint) holds a POSIX record lock (fcntl) on
`driver.lock` for as long as it runs. The kernel releases it when the process ends, however it
ends (SIGKILL, OOM, a lost node), so "is this run being trained?" is answered by the lock, never by
a flag someone must remember to clear: :func:`lock_holder` tests it without taking it. A second
driver on the same run folder is refused instead of interleaving checkpoints with the first.

`driver.json` says who drives it (pid, host, command, Ray address) and, once the session is over,
how it ended (`outcome`: finished, stopped, failed, aborted; `reason`). A record without an outcome
whose lock is free belongs to a driver that died without a word.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

DRIVER_FILE = "driver.json"
LOCK_FILE = "driver.lock"
Outcome = Literal["finished", "stopped", "failed", "aborted"]


class DriverRecord(BaseModel):
    """`RUN/driver.json`. Times are Unix seconds."""

    model_config = ConfigDict(extra="ignore")
    pid: int
    host: str
    started: float
    command: list[str]
    ray_address: str | None = None
    """The Ray cluster joined; None: an embedded local one."""
    ray_job_id: str | None = None
    """The Ray Jobs submission id when the driver runs as a job's entrypoint."""
    ended: float | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    """Why it failed or stopped, one line."""
    step: int | None = None
    """The step of the checkpoint the session ended with."""


def read_driver_record(run_dir: Path) -> DriverRecord | None:
    """`run_dir/driver.json`, or None when there is none or it cannot be read."""
    try:
        return DriverRecord.model_validate_json((Path(run_dir) / DRIVER_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


def _write(run_dir: Path, record: DriverRecord) -> None:
    path = Path(run_dir) / DRIVER_FILE
    tmp = path.with_name(DRIVER_FILE + ".tmp")
    tmp.write_text(json.dumps(record.model_dump(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# struct flock (fcntl(2)) on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t).
_FLOCK = "hhqqi"


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the process holding `run_dir/driver.lock` (a driver training the run), None when
    no process holds it. Tests the lock (F_GETLK) without taking it, so a driver starting at the
    same moment is never refused because of the test. On a shared file system with lock support
    (NFS) a driver on another node counts too; its pid is then that node's."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


class RunBusyError(ValueError):
    """Another driver is training the run."""


@contextlib.contextmanager
def driving(run_dir: Path, ray_address: str | None) -> Iterator[DriverRecord]:
    """While inside, this process is the run's driver: it holds `driver.lock` and `driver.json`
    names it. On the way out the record gets `ended` and an outcome: what the caller set on the
    record, else "failed" (an exception; its message is the reason) or "aborted"
    (KeyboardInterrupt: a second stop signal).

    Raises:
        RunBusyError: another process holds the lock (its pid and host are named).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        other = read_driver_record(run_dir)
        who = f"pid {other.pid} on {other.host}, started {time.ctime(other.started)}" if other else "another process"
        raise RunBusyError(f"run {run_dir} is being trained by {who}: stop it first "
                           "(SIGTERM checkpoints and stops it) or choose another run.name") from None
    record = DriverRecord(pid=os.getpid(), host=socket.gethostname(), started=time.time(), command=list(sys.argv),
                          ray_address=ray_address, ray_job_id=ray_submission_id())
    _write(run_dir, record)
    try:
        yield record
    except KeyboardInterrupt:
        record.outcome = record.outcome or "aborted"
        record.reason = record.reason or "a second stop signal aborted the step in flight"
        raise
    except BaseException as err:
        if record.outcome is None:
            record.outcome = "failed"
            record.reason = record.reason or failure_line(err)
        raise
    finally:
        record.ended = time.time()
        _write(run_dir, record)
        os.close(fd)  # releases the lock


def ray_submission_id() -> str | None:
    """The Ray Jobs submission id when this process is a job's entrypoint: Ray's job supervisor
    passes it in the job config it sets in RAY_JOB_CONFIG_JSON_ENV_VAR (metadata
    `job_submission_id`, ray/dashboard/modules/job/job_supervisor.py)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def failure_line(err: BaseException) -> str:
    """The last line of the innermost cause of `err` (a worker's error inside Ray's wrappers)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    last = [line for line in str(cause).strip().splitlines() if line.strip()][-1:]
    return last[0] if last else type(cause).__name__
