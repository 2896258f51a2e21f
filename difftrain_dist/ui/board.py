"""The dashboard's state over a runs folder, and the readers its routes share."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from difftrain_dist.data_shards.index import INDEX_NAME, ShardIndex
from difftrain_dist.ui import control
from difftrain_dist.ui.runs import (
    CheckpointCache,
    MetricsCache,
    RunSummary,
    is_run_folder,
    read_recipe_yaml,
    section,
    summarize,
)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
"""A run folder's name, as `run.name` (so never "..", never the dashboard's own dot-folder)."""
THUMBNAILS = 6
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def inside(folder: Path, relative: str) -> Path:
    """`folder/relative` when it resolves (links followed) to an existing file inside `folder`.

    Raises:
        HTTPException 404: outside the folder, missing, or not a file.
    """
    if not relative or "\0" in relative or Path(relative).is_absolute():
        raise HTTPException(404, "no such file")
    try:
        root = folder.resolve()
        path = (root / relative).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):  # a name too long, a loop of links
        found = False
    if not found:
        raise HTTPException(404, "no such file")
    return path


class Dashboard:
    """The runs folder, extra shard folders, the caches of parsed files, the registry of started runs.

    `cwd`: where runs it starts resolve their recipes' relative paths (None: the dashboard's own)."""

    def __init__(self, runs_dir: Path, data_dirs: list[Path] | None = None, cwd: Path | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.data_dirs = [Path(d).resolve() for d in data_dirs or []]
        self.cwd = cwd
        self.metrics = MetricsCache()
        self.checkpoints = CheckpointCache()
        self.registry = control.Registry(self.runs_dir)

    def run_dir(self, name: str) -> Path:
        """The folder of run `name` (a direct child of the runs folder that is a run folder, or
        that of a run submitted to a cluster from here). HTTPException 404 otherwise."""
        path = self.runs_dir / name
        if not RUN_NAME.match(name) or not self.is_run(path):
            raise HTTPException(404, f"no run named {name!r}")
        return path

    def is_run(self, path: Path, started: dict[str, dict[str, Any]] | None = None) -> bool:
        """A run folder inside the runs folder (a link to a folder elsewhere is not followed), or
        the folder of a run submitted to a cluster from here."""
        try:
            if path.is_symlink() or not path.is_dir():
                return False
            known = path.name in started if started is not None else self.registry.get(path.name) is not None
            return is_run_folder(path) or known
        except OSError:
            return False

    def summaries(self) -> list[dict[str, Any]]:
        """Every run's row (RunSummary as a dict), the most recently changed first."""
        control.reap_children()
        started = self.registry.all()
        rows = [self.summary(path, started.get(path.name)) for path in sorted(self.runs_dir.iterdir())
                if RUN_NAME.match(path.name) and self.is_run(path, started)]
        return sorted(rows, key=lambda r: -r["updated"])

    def summary(self, path: Path, started: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's row; a folder whose files cannot be read is a row with status unknown and
        the reason, so that one bad folder never hides the others."""
        started = started if started is not None else self.registry.get(path.name)
        try:
            row = summarize(path, self.metrics, self.checkpoints, started).as_dict()
        except Exception as err:  # noqa: BLE001 (anything a hand-edited or damaged file may raise)
            row = RunSummary(name=path.name, family=None, status="unknown", reason=f"cannot read the run folder: "
                             f"{type(err).__name__}: {err}"[:500], step=0, max_steps=None, last_loss=None,
                             samples_per_s=None, eta_s=None, workers=None, where="", updated=0.0).as_dict()
        if started and started["kind"] == "ray" and row["status"] not in ("running", "finished"):
            row.update(ray_job_status(started))
        return row

    def shard_folders(self) -> list[Path]:
        """Shard folders the dashboard shows: each run's `data.shards`, the runs folder's shard
        cache, and every `index.json` folder under `--data` folders (two levels down)."""
        found: list[Path] = []
        for path in sorted(self.runs_dir.iterdir()):
            shards = section(read_recipe_yaml(path), "data").get("shards") if self.is_run(path) else None
            if isinstance(shards, str) and shards:
                found.append(Path(shards))
        for root in [self.runs_dir / ".shards-cache", *self.data_dirs]:
            found += [p.parent for p in (*root.glob(INDEX_NAME), *root.glob(f"*/{INDEX_NAME}"),
                                         *root.glob(f"*/*/{INDEX_NAME}"))]
        unique: list[Path] = []
        for folder in found:
            try:
                folder = folder.resolve()
                if (folder / INDEX_NAME).is_file() and folder not in unique:
                    unique.append(folder)
            except (OSError, ValueError):
                continue
        return unique


def board_of(request: Request) -> Dashboard:
    return request.app.state.board


def ray_job_status(started: dict[str, Any]) -> dict[str, Any]:
    """Status of a run submitted to a Ray cluster, from the Ray Jobs API (when its run folder
    does not show it running or finished: the folder may live on the cluster only)."""
    from difftrain_dist.cluster import jobs

    try:
        info = jobs.status(started["job_id"], started["address"])
    except ValueError as err:
        return {"status": "unknown", "reason": str(err)}
    states = {"PENDING": "starting", "RUNNING": "running", "SUCCEEDED": "finished", "STOPPED": "stopped",
              "FAILED": "failed"}
    return {"status": states.get(info["status"], "unknown"), "reason": info.get("message") or ""}


def dataset_info(folder: Path) -> dict[str, Any]:
    """Counts, bucket histogram and skipped inputs of a shard folder (its index.json)."""
    try:
        index = ShardIndex.load(folder)
    except ValueError as err:
        return {"folder": str(folder), "error": str(err)}
    return {
        "folder": str(folder), "num_samples": index.num_samples, "num_shards": len(index.shards),
        "resolutions": list(index.resolutions), "buckets": dict(index.buckets),
        "skipped": [{"source": s.source, "reason": s.reason, "kind": s.kind} for s in index.skipped],
        "upscaled": len(index.upscaled),
    }


def thumbnail(folder: Path, n: int) -> tuple[bytes, str]:
    """The `n`-th image stored in the folder's shards, in order (bytes, media type). 404 past the end."""
    index = ShardIndex.load(folder)
    seen = 0
    for shard in index.shards:
        with tarfile.open(inside(folder, shard.name)) as tar:
            for member in tar:
                suffix = Path(member.name).suffix.lower()
                if not member.isfile() or suffix not in IMAGE_SUFFIXES:
                    continue
                if seen == n:
                    media = {".png": "image/png", ".webp": "image/webp"}.get(suffix, "image/jpeg")
                    return tar.extractfile(member).read(), media
                seen += 1
    raise HTTPException(404, "no such sample")
