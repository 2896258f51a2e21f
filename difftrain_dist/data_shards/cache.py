"""Shards built on first use from image folders, kept in a cache keyed by what they are built from.

A recipe may name image folders (`data.datasets`) instead of a shard folder. Each folder is
built with `build_shards` into `dataset-<i>/` of one cache entry, and the parts are merged
(`merge_indexes`) into the entry's `index.json`. The entry's name is a digest of every input
file's path and sha256 and of every build option, so the same folders give the same entry (a
later run and a resume reuse it), and a changed, added or removed file gives a new one. An entry
is built in a temporary folder and renamed into place when complete: a half-built entry is never
used, and of two builders racing for one entry the second one's work is discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .build import build_shards
from .files import sha256_file
from .index import INDEX_NAME, ShardIndex, merge_indexes

log = logging.getLogger("difftrain_dist")

CACHE_VERSION = 1
"""Part of every entry's key: a change to how entries are built gives new entries."""


@dataclass(frozen=True)
class FolderBuild:
    """One image folder and how to build it (see `build_shards` for each option)."""

    folder: Path
    resolutions: tuple[int, ...]
    caption_ext: str = ".txt"
    default_caption: str | None = None
    missing_caption: str | None = None
    num_repeats: int = 1
    bucket_step: int = 64


def part_name(i: int) -> str:
    """The folder of dataset `i` inside an entry; its shards are named `dataset-<i>/shard-….tar`."""
    return f"dataset-{i}"


def dataset_of(shard_name: str) -> int:
    """The dataset a shard of an entry was built from: `dataset-<i>/shard-….tar` → i.

    Raises:
        ValueError: the name has no `dataset-<i>/` prefix (not a shard of a cache entry).
    """
    head, sep, _ = shard_name.partition("/")
    number = head.removeprefix("dataset-")
    if not sep or number == head or not number.isdigit():
        raise ValueError(f"shard {shard_name!r}: not a shard of a dataset cache entry (dataset-<i>/...)")
    return int(number)


def folder_digest(folder: Path) -> str:
    """sha256 over every file under `folder` (relative path and content), in path order.

    Raises:
        ValueError: `folder` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def entry_key(builds: Sequence[FolderBuild]) -> str:
    """The cache key of `builds`: the folders' contents and every option, not their paths."""
    parts = [{**asdict(b), "folder": folder_digest(b.folder), "resolutions": list(b.resolutions)} for b in builds]
    text = json.dumps({"version": CACHE_VERSION, "datasets": parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_shards(builds: Sequence[FolderBuild], cache_dir: Path) -> tuple[ShardIndex, bool]:
    """The merged index of `builds`' shards in `cache_dir`, building them when no entry has them.

    Returns:
        (index, built): `built` is False when an existing entry was reused.

    Raises:
        ValueError: a folder is missing, or `build_shards` refused its options or inputs (naming
            the dataset).
    """
    if not builds:
        raise ValueError("data.datasets: give at least one folder")
    entry = Path(cache_dir) / entry_key(builds)
    if (entry / INDEX_NAME).is_file():
        log.info("reusing shards of %d folder(s) from %s", len(builds), entry)
        return ShardIndex.load(entry), False
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i, build in enumerate(builds):
            try:
                build_shards(build.folder, tmp / part_name(i), resolution=list(build.resolutions),
                             caption_ext=build.caption_ext, default_caption=build.default_caption,
                             missing_caption=build.missing_caption, num_repeats=build.num_repeats,
                             bucket_step=build.bucket_step)
            except ValueError as err:
                raise ValueError(f"data.datasets[{i}] ({build.folder}): {err}") from None
        merge_indexes(tmp, [tmp / part_name(i) for i in range(len(builds))])
        try:
            tmp.rename(entry)
        except OSError:  # another builder finished first: its entry is the same
            if not (entry / INDEX_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built shards of %d folder(s) into %s", len(builds), entry)
    return ShardIndex.load(entry), True
