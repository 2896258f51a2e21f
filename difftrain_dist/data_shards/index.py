"""`index.json`: the catalogue of a shard folder (shards, sample counts, buckets, skipped inputs).

Format (version 1)::

    {"version": 1, "resolution": 512, "num_samples": 11,
     "shards": [{"name": "shard-000000.tar", "num_samples": 5, "sha256": "<hex>"}, ...],
     "buckets": {"512x512": 11},
     "skipped": [{"source": "sub/bad.jpg", "reason": "cannot decode image: ..."}]}

Shard names are paths relative to the folder holding `index.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def local_path(path_or_url: str | os.PathLike[str]) -> Path:
    """Turn a local path or a `file://` URL into a `Path`.

    Raises:
        ValueError: for any other URL scheme (s3://, http://, ...).
    """
    text = os.fspath(path_or_url)
    if text.startswith("file:"):
        return Path(url2pathname(unquote(urlparse(text).path)))
    scheme = urlparse(text).scheme
    if len(scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"{text}: only local paths and file:// URLs are supported, not {scheme}://")
    return Path(text)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk_bytes` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _item(record: object, field_name: str) -> Any:
    if field_name not in record.__dataclass_fields__:
        raise KeyError(field_name)
    return getattr(record, field_name)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: `name` relative to the index folder, its sample count and sha256 (hex).

    Fields read as attributes (`info.name`) or like the JSON object (`info["name"]`).
    """

    name: str
    num_samples: int
    sha256: str

    def __getitem__(self, field_name: str) -> Any:
        """`info["name"]` reads like the JSON object (KeyError for unknown fields)."""
        return _item(self, field_name)


@dataclass(frozen=True)
class SkippedInput:
    """An input file that was left out: `source` relative to the source folder, and why.

    Fields read as attributes (`item.source`) or like the JSON object (`item["source"]`).
    """

    source: str
    reason: str

    def __getitem__(self, field_name: str) -> Any:
        """`skipped["source"]` reads like the JSON object (KeyError for unknown fields)."""
        return _item(self, field_name)


@dataclass
class ShardIndex:
    """In-memory `index.json`. `root` is the folder holding it (shard names resolve against it)."""

    resolution: int
    num_samples: int
    shards: list[ShardInfo]
    buckets: dict[str, int]
    skipped: list[SkippedInput] = field(default_factory=list)
    version: int = INDEX_VERSION
    root: Path | None = None

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard, in index order."""
        return [s.num_samples for s in self.shards]

    def shard_path(self, i: int) -> Path:
        """Local path of shard `i`.

        Raises:
            ValueError: if the index has no `root` (it was never saved or loaded).
        """
        if self.root is None:
            raise ValueError("ShardIndex.root is not set: load the index with ShardIndex.load(path)")
        return self.root / self.shards[i].name

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (without `root`)."""
        return {
            "version": self.version,
            "resolution": self.resolution,
            "num_samples": self.num_samples,
            "shards": [vars(s) for s in self.shards],
            "buckets": dict(self.buckets),
            "skipped": [vars(s) for s in self.skipped],
        }

    def save(self, folder: Path) -> Path:
        """Write `folder/index.json` atomically (temp file + rename); sets `root`; returns the path."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self.root = folder
        return path

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike[str]) -> ShardIndex:
        """Read and validate `index.json` (give the file, its folder, or a `file://` URL to either).

        Raises:
            ValueError: the file is missing or not JSON, a field is missing or has the wrong type,
                counts do not add up, or a listed shard file does not exist (each names the file
                and the field).
        """
        path = local_path(path_or_dir)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise ValueError(f"{path}: shard index not found (expected {INDEX_NAME} written by build_shards)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON shard index ({exc})") from exc
        index = _from_dict(doc, path)
        index.root = path.parent
        for i in range(len(index.shards)):
            if not index.shard_path(i).is_file():
                raise ValueError(f"{path}: shards[{i}] file {index.shard_path(i)} does not exist")
        return index

    def verify_checksums(self) -> None:
        """Hash every shard and compare with the index (reads every byte: slow for big datasets).

        Raises:
            ValueError: naming the first shard whose sha256 differs.
        """
        for i, shard in enumerate(self.shards):
            actual = sha256_file(self.shard_path(i))
            if actual != shard.sha256:
                raise ValueError(
                    f"{self.shard_path(i)}: sha256 {actual} does not match index.json ({shard.sha256})"
                )


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ValueError(f"{where}: missing field '{key}'")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: field '{key}' should be {kind}, found {type(value).__name__} {value!r}")
    return value


def _from_dict(doc: Any, path: Path) -> ShardIndex:
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    version = _get(doc, "version", int, str(path))
    if version != INDEX_VERSION:
        raise ValueError(f"{path}: field 'version' is {version}, this reader understands {INDEX_VERSION}")
    shards = []
    for i, raw in enumerate(_get(doc, "shards", list, str(path))):
        where = f"{path}: shards[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object, found {raw!r}")
        shards.append(ShardInfo(_get(raw, "name", str, where), _get(raw, "num_samples", int, where),
                                _get(raw, "sha256", str, where)))
    skipped = []
    for i, raw in enumerate(_get(doc, "skipped", list, str(path))):
        where = f"{path}: skipped[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object, found {raw!r}")
        skipped.append(SkippedInput(_get(raw, "source", str, where), _get(raw, "reason", str, where)))
    index = ShardIndex(
        resolution=_get(doc, "resolution", int, str(path)),
        num_samples=_get(doc, "num_samples", int, str(path)),
        shards=shards,
        buckets=dict(_get(doc, "buckets", dict, str(path))),
        skipped=skipped,
        version=version,
    )
    total = sum(index.shard_sizes)
    if total != index.num_samples or any(n < 0 for n in index.shard_sizes):
        raise ValueError(
            f"{path}: field 'num_samples' is {index.num_samples} but the shards list {total} samples"
        )
    return index
