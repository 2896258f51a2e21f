"""What the dashboard knows about a run, read from the run folder and the live process each time.

Nothing here is stored: a run's status comes from the driver lock (held while a driver trains it,
released by the kernel however that process ends), the driver's record of how its last session
ended, and the checkpoints on disk (see :func:`run_status`). The only extra source is the
dashboard's own table of the runs it started (`registry.py`), which says where each one runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difftrain_dist.distrib.checkpoint import CheckpointInfo, checkpoint_folders, inspect_checkpoint
from difftrain_dist.distrib.driver.record import DriverRecord, lock_holder, read_driver_record
from difftrain_dist.distrib.metrics import METRICS_FILE

CONSOLE_LOG = "console.log"
"""The output of a run the dashboard started (its driver's stdout and stderr)."""
SAMPLE_FILE = re.compile(r"^step_(\d+)\.png$")
RECENT = 20
"""Steps averaged for samples/s and ETA."""


def is_run_folder(path: Path) -> bool:
    """A folder `train` made (recipe.yaml, driver.json) or the dashboard is starting (console.log)."""
    return path.is_dir() and any((path / name).is_file() for name in ("recipe.yaml", "driver.json", CONSOLE_LOG))


def read_recipe_yaml(run_dir: Path) -> dict[str, Any]:
    """`run_dir/recipe.yaml` as a mapping ({} when missing or unreadable): the recipe as the
    driver saved it, every default spelled out."""
    try:
        raw = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    return raw if isinstance(raw, dict) else {}


def section(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    """`recipe[name]` when it is a mapping, else {} (a hand-edited recipe.yaml may hold anything)."""
    value = recipe.get(name)
    return value if isinstance(value, dict) else {}


def number(value: Any) -> float | None:
    """`value` as a finite float, None when it is not a number (or NaN, inf: JSON has no such value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _clean(entry: Any) -> dict | None:
    """A metrics.jsonl entry with an int step, its non-finite numbers as None; None for anything else."""
    if not isinstance(entry, dict) or isinstance(entry.get("step"), bool) or not isinstance(entry.get("step"), int):
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}


class MetricsCache:
    """`metrics.jsonl` of many runs, parsed incrementally: each call reads only the bytes appended
    since the last one; a new file (a resumed session rewrites it) is read again from the start.
    `session` (the file's inode) tells a client that its copy must be dropped."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[int, int, list[dict]]] = {}

    def read(self, run_dir: Path) -> tuple[str, list[dict]]:
        path = run_dir / METRICS_FILE
        try:
            stat = path.stat()
            if not path.is_file():
                return "", []
        except OSError:
            return "", []
        inode, offset, entries = self._files.get(path, (stat.st_ino, 0, []))
        if inode != stat.st_ino or stat.st_size < offset:
            offset, entries = 0, []
        if stat.st_size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(stat.st_size - offset)
            whole = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
            for line in whole.splitlines():
                try:
                    entry = _clean(json.loads(line))
                except ValueError:
                    continue
                if entry is not None:
                    entries.append(entry)
            offset += len(whole)
        self._files[path] = (stat.st_ino, offset, entries)
        return str(stat.st_ino), entries


class CheckpointCache:
    """`inspect_checkpoint` per folder, kept while the folder's files keep their names, sizes and
    modification times (validation hashes every file; a run page polls)."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple, CheckpointInfo]] = {}

    def inspect(self, folder: Path) -> CheckpointInfo:
        try:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        except OSError:
            key = ()
        cached = self._seen.get(folder)
        if cached is None or cached[0] != key:
            cached = (key, inspect_checkpoint(folder))
            self._seen[folder] = cached
        return cached[1]

    def all(self, run_dir: Path) -> list[CheckpointInfo]:
        """The run's checkpoints, oldest first."""
        return [self.inspect(folder) for folder in checkpoint_folders(run_dir)]


@dataclass
class Status:
    state: str
    """starting, running, finished, stopped, failed, aborted or unknown."""
    reason: str = ""
    pid: int | None = None
    """The driver's pid while it runs."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path, max_steps: int | None, newest_valid: CheckpointInfo | None,
               record: DriverRecord | None, started: dict[str, Any] | None = None) -> Status:
    """The status of a run, from the truth:

    - running: a process holds the driver lock (`lock_holder`);
    - starting: the dashboard started a process for it that is alive and has not taken the lock
      yet (`started`: its row in the registry);
    - finished, stopped, failed, aborted: as the driver of the last session recorded when it
      ended; a driver that ended without recording anything (killed, its machine lost) is failed,
      with that reason, even when its last checkpoint is complete (writing the LoRA file may be
      what it died in);
    - with no driver record at all (a run older than the record, or a folder copied here): from
      the checkpoints: finished when the newest valid one is at `max_steps`, stopped when there
      is one, else unknown.
    A stopped or failed run with a valid checkpoint says which step it can resume from.
    """
    holder = lock_holder(run_dir)
    if holder is not None:
        where = f"pid {holder}" + (f" on {record.host}" if record else "")
        return Status("running", where, pid=holder)
    if started and started.get("kind") == "local" and (record is None or record.started < started["started"]):
        pid = int(started["pid"])
        if pid_alive(pid) and _is_our_process(pid):
            return Status("starting", f"pid {pid}", pid=pid)
        return Status("failed", last_error_line(run_dir / CONSOLE_LOG) or "the process ended before training began")
    resumable = f"; resumable from step {newest_valid.step}" if newest_valid else ""
    if record is None:
        if newest_valid is not None and max_steps is not None and newest_valid.step >= max_steps:
            return Status("finished", f"step {newest_valid.step}")
        if newest_valid is not None:
            return Status("stopped", f"checkpoint at step {newest_valid.step} (no driver record)")
        return Status("unknown", "no driver record and no valid checkpoint")
    if record.outcome == "finished":
        return Status("finished", f"step {record.step}")
    if record.outcome == "stopped":
        return Status("stopped", f"checkpoint at step {newest_valid.step}" if newest_valid else record.reason or "")
    if record.outcome in ("failed", "aborted"):
        return Status(record.outcome, (record.reason or "") + resumable)
    return Status("failed", f"the driver (pid {record.pid} on {record.host}) ended without recording how: "
                            f"killed, or its machine went down{resumable}")


def last_error_line(log: Path) -> str:
    """The last `error:` line of a console log (the CLI's one-line reason), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def _is_our_process(pid: int) -> bool:
    """The pid runs this package (not a reused pid), as far as /proc tells (True where it cannot)."""
    try:
        return b"difftrain" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


@dataclass
class RunSummary:
    """One row of the runs page (times in s, rates in samples/s)."""

    name: str
    family: str | None
    status: str
    reason: str
    step: int
    max_steps: int | None
    last_loss: float | None
    samples_per_s: float | None
    eta_s: float | None
    workers: int | None
    where: str
    updated: float
    checkpoints: int = 0
    newest_checkpoint: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def where_it_runs(record: DriverRecord | None, started: dict[str, Any] | None) -> str:
    if started and started.get("kind") == "ray":
        return f"Ray job {started['job_id']} at {started['address']}"
    if record is None:
        return ""
    cluster = f"Ray at {record.ray_address}" if record.ray_address else "embedded Ray"
    job = f", job {record.ray_job_id}" if record.ray_job_id else ""
    host = "this machine" if record.host == socket.gethostname() else record.host
    return f"{host}, {cluster}{job}"


def summarize(run_dir: Path, metrics: MetricsCache, checkpoints: CheckpointCache,
              started: dict[str, Any] | None = None) -> RunSummary:
    """The runs-page row of `run_dir`, computed now."""
    recipe = read_recipe_yaml(run_dir)
    max_steps = section(recipe, "train").get("max_steps")
    max_steps = max_steps if isinstance(max_steps, int) and not isinstance(max_steps, bool) else None
    _, entries = metrics.read(run_dir)
    infos = checkpoints.all(run_dir)
    valid = [info for info in infos if info.valid]
    record = read_driver_record(run_dir)
    status = run_status(run_dir, max_steps, valid[-1] if valid else None, record, started)
    last = entries[-1] if entries else {}
    recent = entries[-RECENT:]
    seconds = sum(number(e.get("step_time_s")) or 0.0 for e in recent)
    samples = sum((number(e.get("samples_per_s")) or 0.0) * (number(e.get("step_time_s")) or 0.0) for e in recent)
    step_time = seconds / len(recent) if recent else None
    rate = samples / seconds if seconds > 0 else None
    step = last.get("step", valid[-1].step if valid else 0)
    eta = (max_steps - step) * step_time if status.state == "running" and step_time and max_steps else None
    workers = last.get("world_size") or section(recipe, "distributed").get("num_workers")
    workers = workers if isinstance(workers, int) and not isinstance(workers, bool) else None
    try:
        updated = max(p.stat().st_mtime for p in run_dir.iterdir())
    except (OSError, ValueError):
        updated = time.time()
    return RunSummary(
        name=run_dir.name, family=str(section(recipe, "model").get("arch") or "") or None, status=status.state,
        reason=status.reason, step=step, max_steps=max_steps, last_loss=number(last.get("loss")),
        samples_per_s=rate, eta_s=eta,
        workers=workers, where=where_it_runs(record, started), updated=updated, checkpoints=len(infos),
        newest_checkpoint=valid[-1].step if valid else None,
    )


def sample_grids(run_dir: Path) -> list[dict[str, Any]]:
    """`samples/step_<step>.png` of a run, by step: [{"step", "file"}] (file relative to run_dir)."""
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := SAMPLE_FILE.match(p.name))]
    return [{"step": step, "file": f"samples/{name}"} for step, name in sorted(found)]
