"""`index.json`: the catalogue of a shard folder (shards, sample counts, buckets, skipped inputs).

Format (version 2)::

    {"version": 2, "resolutions": [512], "num_samples": 11,
     "shards": [{"name": "shard-000000.tar", "num_samples": 5, "sha256": "<hex>", "repeats": 1,
                 "buckets": {"512x512": 3, "576x384": 2}, "num_bytes": 40960}, ...],
     "buckets": {"512x512": 7, "576x384": 4},
     "skipped": [{"source": "sub/bad.jpg", "kind": "decode", "reason": "cannot decode image: ..."}],
     "upscaled": [{"source": "sub/small.png", "resolution": 512, "reason": "smaller than ..."}],
     "build": {"bucket_step": 64, ...}}

- Shard names are paths relative to the folder holding `index.json`.
- `num_samples` counts samples stored in the tars; a shard's `buckets` splits its `num_samples` by
  bucket ("WxH", px). The top-level `buckets` is the histogram of all stored samples.
- `sha256` (hex) and `num_bytes` (the tar's size) let readers refuse a corrupt or truncated
  shard: `ShardIndex.load` compares every shard's size (one stat each), the reader hashes each
  shard before yielding any of its samples (see `ShardIndex.verify_shard`). `num_bytes` is
  optional (indexes written before it existed are checked by sha256 alone).
- `repeats` (ai-toolkit's `num_repeats`): the reader yields every sample of that shard this many
  times per epoch. Per-epoch bucket counts are therefore `buckets[b] * repeats`, which is all a
  reader needs to compute its quotas without opening a tar.
- `skipped` lists every input left out, with a short `kind` (e.g. "decode", "no_caption",
  "duplicate_stem", "small_image") and a human-readable `reason`.
- `upscaled` lists every sample written larger than its source image (`small_images: upscale`):
  source, resolution (px) and reason (sizes and scale). Absent in older files (read as []).
- `build` records the options the shards were built with (informational). Nothing in the file
  depends on when or where it was built: the same inputs and options give the same bytes.
- `precomputed` (optional) lists the sidecar tars of VAE latent parameters and text embeddings
  written by `shards precompute`, one per shard (see precomputed.py).

Version 1 files (one square bucket, no per-shard buckets) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from .buckets import parse_bucket
from .precomputed import Precomputed, SidecarInfo

INDEX_NAME = "index.json"
INDEX_VERSION = 2
READ_VERSIONS = (1, 2)


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


_RECOPY = "copy it again or rebuild the shards"


def check_size(path: Path, num_bytes: int | None, what: str = "shard") -> None:
    """Compare a file's size with the `num_bytes` index.json lists (None: not recorded, no check).

    Raises:
        ValueError: naming the file, "truncated" when it is shorter, "corrupt" when longer.
    """
    if num_bytes is None:
        return
    size = path.stat().st_size
    if size < num_bytes:
        raise ValueError(f"{path}: {what} is truncated: {size} of the {num_bytes} bytes index.json lists; {_RECOPY}")
    if size > num_bytes:
        raise ValueError(f"{path}: {what} is corrupt: {size} bytes, but index.json lists {num_bytes}; {_RECOPY}")


def check_file(path: Path, sha256: str, num_bytes: int | None = None, what: str = "shard") -> None:
    """Check a file against index.json: its size (when `num_bytes` is known), then its sha256
    (reads every byte, about 1.6 GB/s on one core; see README "Datasets and shards").

    Raises:
        ValueError: naming the file and saying it is truncated or corrupt (sizes / sha256 values).
    """
    check_size(path, num_bytes, what)
    actual = sha256_file(path)
    if actual != sha256:
        state = "corrupt" if num_bytes is not None else "corrupt or truncated"
        advice = _RECOPY if what == "shard" else "copy it again or run `shards precompute` again"
        raise ValueError(f"{path}: {what} is {state}: sha256 {actual} does not match index.json ({sha256}); "
                         f"{advice}")


def _item(record: object, field_name: str) -> Any:
    if field_name not in record.__dataclass_fields__:
        raise KeyError(field_name)
    return getattr(record, field_name)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: `name` relative to the index folder, its stored sample count, sha256 (hex), its
    samples per bucket ("WxH" -> count, summing to `num_samples`), `repeats` per epoch and its
    size in bytes (`num_bytes`; None in indexes written before sizes were recorded).

    Fields read as attributes (`info.name`) or like the JSON object (`info["name"]`).
    """

    name: str
    num_samples: int
    sha256: str
    buckets: dict[str, int] = field(default_factory=dict)
    repeats: int = 1
    num_bytes: int | None = None

    def __getitem__(self, field_name: str) -> Any:
        """`info["name"]` reads like the JSON object (KeyError for unknown fields)."""
        return _item(self, field_name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in index.json (`num_bytes` left out when unknown)."""
        return {k: v for k, v in vars(self).items() if not (k == "num_bytes" and v is None)}


@dataclass(frozen=True)
class SkippedInput:
    """An input that was left out: `source` (path relative to the source folder, `TAR#KEY` for a
    tar member, or a URL), why (`reason`), and a short `kind` for counting.

    Fields read as attributes (`item.source`) or like the JSON object (`item["source"]`).
    """

    source: str
    reason: str
    kind: str = "other"

    def __getitem__(self, field_name: str) -> Any:
        """`skipped["source"]` reads like the JSON object (KeyError for unknown fields)."""
        return _item(self, field_name)


@dataclass(frozen=True)
class UpscaledInput:
    """A sample written larger than its source (`small_images: upscale`): `source` (as in
    `SkippedInput`), the training `resolution` (px) and a human-readable `reason` (sizes in px,
    scale factor).

    Fields read as attributes (`item.source`) or like the JSON object (`item["source"]`).
    """

    source: str
    resolution: int
    reason: str

    def __getitem__(self, field_name: str) -> Any:
        """`upscaled["source"]` reads like the JSON object (KeyError for unknown fields)."""
        return _item(self, field_name)


@dataclass
class ShardIndex:
    """In-memory `index.json`. `root` is the folder holding it (shard names resolve against it)."""

    resolutions: list[int]
    num_samples: int
    shards: list[ShardInfo]
    buckets: dict[str, int]
    skipped: list[SkippedInput] = field(default_factory=list)
    upscaled: list[UpscaledInput] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    version: int = INDEX_VERSION
    root: Path | None = None
    precomputed: Precomputed | None = None
    """Sidecars of precomputed latents / embeddings (None: the reader yields pixels only)."""

    @property
    def shard_sizes(self) -> list[int]:
        """Samples stored per shard, in index order."""
        return [s.num_samples for s in self.shards]

    @property
    def bucket_names(self) -> list[str]:
        """Every bucket of every shard, sorted by (width, height)."""
        names = {b for s in self.shards for b, n in s.buckets.items() if n > 0}
        return sorted(names, key=parse_bucket)

    def epoch_counts(self) -> list[list[int]]:
        """Samples per epoch (repeats included): element [s][b] for shard s, bucket_names[b]."""
        names = self.bucket_names
        return [[s.buckets.get(b, 0) * s.repeats for b in names] for s in self.shards]

    @property
    def samples_per_epoch(self) -> int:
        """Samples an epoch holds, every shard's samples counted `repeats` times."""
        return sum(s.num_samples * s.repeats for s in self.shards)

    def shard_path(self, i: int) -> Path:
        """Local path of shard `i`.

        Raises:
            ValueError: if the index has no `root` (it was never saved or loaded).
        """
        if self.root is None:
            raise ValueError("ShardIndex.root is not set: load the index with ShardIndex.load(path)")
        return self.root / self.shards[i].name

    def sidecar_path(self, i: int) -> Path:
        """Local path of shard `i`'s precomputed sidecar.

        Raises:
            ValueError: if the index has no `precomputed` block or no `root`.
        """
        if self.precomputed is None:
            raise ValueError(f"index {self.root}: has no precomputed sidecars (run `shards precompute`)")
        self.shard_path(i)  # checks root
        return self.root / self.precomputed.sidecars[i].name

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (without `root`), always in the current format version."""
        doc = {
            "version": INDEX_VERSION,
            "resolutions": list(self.resolutions),
            "num_samples": self.num_samples,
            "shards": [s.to_dict() for s in self.shards],
            "buckets": dict(self.buckets),
            "skipped": [vars(s) for s in self.skipped],
            "upscaled": [vars(u) for u in self.upscaled],
            "build": dict(self.build),
        }
        if self.precomputed is not None:
            doc["precomputed"] = self.precomputed.to_dict()
        return doc

    def save(self, folder: Path) -> Path:
        """Write `folder/index.json` atomically (temp file + rename); sets `root`; returns the path."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self.root = folder
        self.version = INDEX_VERSION
        return path

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike[str]) -> ShardIndex:
        """Read and validate `index.json` (give the file, its folder, or a `file://` URL to either).

        Raises:
            ValueError: the file is missing or not JSON, a field is missing or has the wrong type,
                counts do not add up, a listed shard file does not exist or has another size
                than `num_bytes` (truncated), each naming the file and the field. Checksums are
                not read here (see `verify_shard`).
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
            check_size(index.shard_path(i), index.shards[i].num_bytes)
            if index.precomputed is not None and not index.sidecar_path(i).is_file():
                raise ValueError(f"{path}: precomputed.sidecars[{i}] file {index.sidecar_path(i)} "
                                 "does not exist; run `shards precompute` again")
        return index

    def verify_shard(self, i: int) -> None:
        """Check shard `i`'s size and sha256 against the index (reads the whole file).

        Raises:
            ValueError: naming the shard file: truncated, or corrupt (sha256 mismatch).
        """
        shard = self.shards[i]
        check_file(self.shard_path(i), shard.sha256, shard.num_bytes)

    def verify_sidecar(self, i: int) -> None:
        """Check the sha256 of shard `i`'s precomputed sidecar against the index.

        Raises:
            ValueError: naming the sidecar file when its sha256 differs, or when the index has no
                `precomputed` block.
        """
        check_file(self.sidecar_path(i), self.precomputed.sidecars[i].sha256, what="sidecar")

    def verify_checksums(self) -> None:
        """`verify_shard` (and `verify_sidecar`) for every shard, in order: reads every byte.

        Raises:
            ValueError: naming the first truncated or corrupt file.
        """
        for i in range(len(self.shards)):
            self.verify_shard(i)
            if self.precomputed is not None:
                self.verify_sidecar(i)


def merge_indexes(root: Path, parts: list[Path]) -> ShardIndex:
    """Write `root/index.json` over the shards of several built folders inside `root`.

    This is how datasets with different `num_repeats` (or resolutions) train together: build each
    into `root/<name>`, then merge. Shard names become `<name>/shard-....tar`; every part keeps its
    shards' `repeats`; skipped and upscaled inputs are carried over with the part's folder prefixed. Precomputed
    sidecars are kept when every part has them from the same model, arch and conditioning.

    Raises:
        ValueError: `root` already holds index.json, a part is not a folder inside `root`, or a
            part's index.json is missing or invalid.
    """
    root = Path(root)
    if (root / INDEX_NAME).exists():
        raise ValueError(f"{root / INDEX_NAME}: already exists; merge into a folder without index.json")
    shards, skipped, upscaled, resolutions, buckets, precomputed = [], [], [], [], {}, []
    for part in parts:
        part = Path(part)
        try:
            rel = part.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{part}: not a folder inside {root}; shard names must be relative") from None
        if rel == ".":
            raise ValueError(f"{part}: is the merge folder itself; give its sub-folders")
        index = ShardIndex.load(part)
        shards += [replace(s, name=f"{rel}/{s.name}", buckets=dict(s.buckets)) for s in index.shards]
        skipped += [SkippedInput(f"{rel}: {s.source}", s.reason, s.kind) for s in index.skipped]
        upscaled += [replace(u, source=f"{rel}: {u.source}") for u in index.upscaled]
        resolutions += [r for r in index.resolutions if r not in resolutions]
        for name, count in index.buckets.items():
            buckets[name] = buckets.get(name, 0) + count
        precomputed.append(None if index.precomputed is None else replace(
            index.precomputed, sidecars=tuple(SidecarInfo(f"{rel}/{s.name}", s.sha256)
                                              for s in index.precomputed.sidecars)))
    merged = ShardIndex(resolutions=resolutions, num_samples=sum(s.num_samples for s in shards),
                        shards=shards, buckets=buckets, skipped=skipped, upscaled=upscaled,
                        build={"merged": [Path(p).resolve().relative_to(root.resolve()).as_posix()
                                          for p in parts]},
                        precomputed=_merged_precomputed(precomputed))
    merged.save(root)
    return merged


def _merged_precomputed(parts: list[Precomputed | None]) -> Precomputed | None:
    """The parts' sidecars together when every part was precomputed with the same model, else None."""
    if not parts or any(p is None for p in parts):
        return None
    first = parts[0]
    if any((p.model, p.arch, p.conditioning) != (first.model, first.arch, first.conditioning) for p in parts):
        return None
    return replace(first, sidecars=tuple(s for p in parts for s in p.sidecars))


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ValueError(f"{where}: missing field '{key}'")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: field '{key}' should be {kind}, found {type(value).__name__} {value!r}")
    return value


def _counts(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in raw.items()):
        raise ValueError(f"{where}: field 'buckets' should map 'WxH' to sample counts >= 0, found {raw!r}")
    for name in raw:
        try:
            parse_bucket(name)
        except ValueError as exc:
            raise ValueError(f"{where}: field 'buckets': {exc}") from None
    return dict(raw)


def _shard(raw: Any, where: str, version: int, single_bucket: str | None) -> ShardInfo:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, found {raw!r}")
    name, num = _get(raw, "name", str, where), _get(raw, "num_samples", int, where)
    sha = _get(raw, "sha256", str, where)
    size = _get(raw, "num_bytes", int, where) if "num_bytes" in raw else None
    if size is not None and size < 0:
        raise ValueError(f"{where}: field 'num_bytes' should be >= 0, found {size}")
    if version == 1:  # one square bucket for the whole index
        return ShardInfo(name, num, sha, {single_bucket: num} if single_bucket and num else {}, 1, size)
    buckets = _counts(_get(raw, "buckets", dict, where), where)
    repeats = _get(raw, "repeats", int, where)
    if repeats < 1:
        raise ValueError(f"{where}: field 'repeats' should be >= 1, found {repeats}")
    if sum(buckets.values()) != num:
        raise ValueError(f"{where}: field 'buckets' adds up to {sum(buckets.values())} samples, "
                         f"but 'num_samples' is {num}")
    return ShardInfo(name, num, sha, buckets, repeats, size)


def _from_dict(doc: Any, path: Path) -> ShardIndex:
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    where = str(path)
    version = _get(doc, "version", int, where)
    if version not in READ_VERSIONS:
        raise ValueError(f"{path}: field 'version' is {version}, this reader understands {READ_VERSIONS}")
    buckets = _counts(_get(doc, "buckets", dict, where), where)
    if version == 1:
        resolutions = [_get(doc, "resolution", int, where)]
        if len(buckets) > 1:
            raise ValueError(f"{path}: a version 1 index has one bucket, found {sorted(buckets)}; rebuild it")
        single = next(iter(buckets), None)
    else:
        resolutions = _get(doc, "resolutions", list, where)
        single = None
    shards = [_shard(raw, f"{path}: shards[{i}]", version, single)
              for i, raw in enumerate(_get(doc, "shards", list, where))]
    skipped = []
    for i, raw in enumerate(_get(doc, "skipped", list, where)):
        at = f"{path}: skipped[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{at}: expected an object, found {raw!r}")
        skipped.append(SkippedInput(_get(raw, "source", str, at), _get(raw, "reason", str, at),
                                    raw.get("kind", "other")))
    upscaled = []
    for i, raw in enumerate(_get(doc, "upscaled", list, where) if "upscaled" in doc else []):
        at = f"{path}: upscaled[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{at}: expected an object, found {raw!r}")
        upscaled.append(UpscaledInput(_get(raw, "source", str, at), _get(raw, "resolution", int, at),
                                      _get(raw, "reason", str, at)))
    build = doc.get("build", {})
    if not isinstance(build, dict):
        raise ValueError(f"{path}: field 'build' should be an object, found {build!r}")
    precomputed = doc.get("precomputed")
    if precomputed is not None:
        precomputed = Precomputed.from_dict(precomputed, where, len(shards))
    index = ShardIndex(resolutions=resolutions, num_samples=_get(doc, "num_samples", int, where),
                       shards=shards, buckets=buckets, skipped=skipped, upscaled=upscaled,
                       build=build, version=version, precomputed=precomputed)
    total = sum(index.shard_sizes)
    if total != index.num_samples or any(n < 0 for n in index.shard_sizes):
        raise ValueError(
            f"{path}: field 'num_samples' is {index.num_samples} but the shards list {total} samples"
        )
    return index
