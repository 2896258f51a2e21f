"""`index.json`: the catalogue of a shard folder (shards, sample counts, buckets, skipped inputs).

Format (version 2)::

    {"version": 2, "resolutions": [512], "num_samples": 11,
     "shards": [{"name": "shard-000000.tar", "num_samples": 5, "sha256": "<hex>", "repeats": 1,
                 "buckets": {"512x512": 3, "576x384": 2}, "num_bytes": 40960}, ...],
     "buckets": {"512x512": 7, "576x384": 4},
     "skipped": [{"source": "sub/bad.jpg", "reason": "cannot decode image: ...", "kind": "decode"}],
     "upscaled": [{"source": "sub/small.png", "resolution": 512, "reason": "smaller than ..."}],
     "build": {"bucket_step": 64, ...}}

- Shard names are paths relative to the folder holding `index.json`.
- `num_samples` counts samples stored in the tars; a shard's `buckets` splits its `num_samples` by
  bucket ("WxH", px). The top-level `buckets` is the histogram of all stored samples.
- `sha256` (hex) and `num_bytes` (the tar's size) let readers refuse a corrupt or truncated
  shard: `ShardIndex.load` compares every shard's size (one stat each), the reader hashes each
  shard before yielding any of its samples (see `ShardIndex.verify_shard`). Without `num_bytes`
  a shard is checked by sha256 alone.
- `repeats` (ai-toolkit's `num_repeats`): the reader yields every sample of that shard this many
  times per epoch. Per-epoch bucket counts are therefore `buckets[b] * repeats`, which is all a
  reader needs to compute its quotas without opening a tar.
- `skipped` lists every input left out, with a short `kind` (e.g. "decode", "no_caption",
  "duplicate_stem", "small_image") and a human-readable `reason`.
- `upscaled` lists every sample written larger than its source image (`small_images: upscale`):
  source, resolution (px) and reason (sizes and scale).
- `build` records the options the shards were built with (informational). Nothing in the file
  depends on when or where it was built: the same inputs and options give the same bytes.
- `precomputed` (optional) lists the sidecar tars of VAE latent parameters and text embeddings
  written by `shards precompute`, one per shard (see `Precomputed` and precomputed.py).

The file is read and written only through the pydantic models below (`ShardIndex.load`,
`ShardIndex.save`); an invalid file raises ValueError naming the file and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .buckets import parse_bucket
from .files import check_file, check_size, local_path

INDEX_NAME = "index.json"
INDEX_VERSION = 2


class _Record(BaseModel):
    """A JSON object of index.json: strict types, unknown fields refused, read as attributes
    (`info.name`) or like the JSON object (`info["name"]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __getitem__(self, field_name: str) -> Any:
        """`record["name"]` reads like the JSON object (KeyError for unknown fields)."""
        if field_name not in type(self).model_fields:
            raise KeyError(field_name)
        return getattr(self, field_name)


def _check_bucket_names(counts: dict[str, int]) -> dict[str, int]:
    for name in counts:
        parse_bucket(name)
    return counts


BucketCounts = Annotated[dict[str, NonNegativeInt], AfterValidator(_check_bucket_names)]
"""Samples per bucket: "WxH" (px) → count >= 0."""


def _relative_name(name: str) -> str:
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ".." in parts or "\0" in name or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"should be a path relative to the index folder, without '..', found {name!r}")
    return name


RelativeName = Annotated[str, AfterValidator(_relative_name)]


class ShardInfo(_Record):
    """One shard: `name` relative to the index folder, its stored sample count, sha256 (hex), its
    samples per bucket ("WxH" -> count, summing to `num_samples`), `repeats` per epoch and its
    size in bytes (`num_bytes`; None: not recorded, checked by sha256 alone)."""

    name: RelativeName
    num_samples: int = Field(ge=0)
    sha256: str
    buckets: BucketCounts = Field(default_factory=dict)
    repeats: int = Field(1, ge=1)
    num_bytes: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _buckets_add_up(self) -> ShardInfo:
        if sum(self.buckets.values()) != self.num_samples:
            raise ValueError(f"field 'buckets' adds up to {sum(self.buckets.values())} samples, "
                             f"but 'num_samples' is {self.num_samples}")
        return self


class SkippedInput(_Record):
    """An input that was left out: `source` (path relative to the source folder, `TAR#KEY` for a
    tar member, or a URL), why (`reason`), and a short `kind` for counting."""

    source: str
    reason: str
    kind: str = "other"


class UpscaledInput(_Record):
    """A sample written larger than its source (`small_images: upscale`): `source` (as in
    `SkippedInput`), the training `resolution` (px) and a human-readable `reason` (sizes in px,
    scale factor)."""

    source: str
    resolution: int = Field(ge=1)
    reason: str


class SidecarInfo(_Record):
    """One shard's sidecar of precomputed latents / embeddings: `name` relative to the index
    folder and its sha256 (hex)."""

    name: RelativeName
    sha256: str


class Precomputed(_Record):
    """index.json's `precomputed` block::

        {"model": "/models/sd15", "arch": "sd15", "conditioning": ["encoder_hidden_states"],
         "sidecars": [{"name": "shard-000000.precomputed.tar", "sha256": "<hex>"}, ...]}

    `sidecars[i]` belongs to `shards[i]`; `conditioning` names the `KEY.<name>.npy` members (the
    keyword arguments `encode_prompts` returned); `model`/`arch` say what computed them.
    """

    model: str
    arch: str
    conditioning: tuple[str, ...]
    sidecars: tuple[SidecarInfo, ...]

    @field_validator("conditioning")
    @classmethod
    def _member_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if not all(n and "." not in n and n != "latent" for n in names):
            raise ValueError(f"should list member names (no dots, not 'latent'), found {list(names)!r}")
        return names


class ShardIndex(BaseModel):
    """In-memory `index.json` (see the module docstring). `root` is the folder holding it (shard
    names resolve against it); it is set by `load` and `save`, not stored in the file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: Literal[2] = INDEX_VERSION
    resolutions: list[PositiveInt]
    num_samples: int = Field(ge=0)
    shards: list[ShardInfo]
    buckets: BucketCounts
    skipped: list[SkippedInput] = Field(default_factory=list)
    upscaled: list[UpscaledInput] = Field(default_factory=list)
    build: dict[str, Any] = Field(default_factory=dict)
    precomputed: Precomputed | None = None
    """Sidecars of precomputed latents / embeddings (None: the reader yields pixels only)."""
    _root: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _counts_add_up(self) -> ShardIndex:
        if self.shards and not self.resolutions:
            raise ValueError("field 'resolutions' is empty, but the index lists shards")
        histogram: dict[str, int] = {}
        for shard in self.shards:
            for bucket, count in shard.buckets.items():
                histogram[bucket] = histogram.get(bucket, 0) + count
        if {b: n for b, n in self.buckets.items() if n} != {b: n for b, n in histogram.items() if n}:
            raise ValueError(f"field 'buckets' is {self.buckets}, but the shards hold {histogram}")
        total = sum(self.shard_sizes)
        if total != self.num_samples:
            raise ValueError(f"field 'num_samples' is {self.num_samples} but the shards list {total} samples")
        if self.precomputed is not None and len(self.precomputed.sidecars) != len(self.shards):
            raise ValueError(f"field 'precomputed.sidecars' lists {len(self.precomputed.sidecars)} sidecars "
                             f"for {len(self.shards)} shards; run `shards precompute` again")
        return self

    @property
    def root(self) -> Path | None:
        """The folder holding index.json (None until saved or loaded)."""
        return self._root

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
        if self._root is None:
            raise ValueError("ShardIndex.root is not set: load the index with ShardIndex.load(path)")
        return self._root / self.shards[i].name

    def sidecar_path(self, i: int) -> Path:
        """Local path of shard `i`'s precomputed sidecar.

        Raises:
            ValueError: if the index has no `precomputed` block or no `root`.
        """
        if self.precomputed is None:
            raise ValueError(f"index {self._root}: has no precomputed sidecars (run `shards precompute`)")
        self.shard_path(i)  # checks root
        return self._root / self.precomputed.sidecars[i].name

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (without `root`; `num_bytes` and `precomputed` left out when None)."""
        doc = self.model_dump(mode="json", exclude={"precomputed"} if self.precomputed is None else set())
        for shard in doc["shards"]:
            if shard["num_bytes"] is None:
                del shard["num_bytes"]
        return doc

    def save(self, folder: Path) -> Path:
        """Write `folder/index.json` atomically (temp file + rename); sets `root`; returns the path."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self._root = folder
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
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, or an int too long
            raise ValueError(f"{path}: not a valid JSON shard index ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
        try:
            index = cls.model_validate_json(text)
        except ValidationError as err:
            raise ValueError(f"{path}: {_first_problem(err)}") from None
        index._root = path.parent
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
        shards += [s.model_copy(update={"name": f"{rel}/{s.name}"}) for s in index.shards]
        skipped += [s.model_copy(update={"source": f"{rel}: {s.source}"}) for s in index.skipped]
        upscaled += [u.model_copy(update={"source": f"{rel}: {u.source}"}) for u in index.upscaled]
        resolutions += [r for r in index.resolutions if r not in resolutions]
        for name, count in index.buckets.items():
            buckets[name] = buckets.get(name, 0) + count
        precomputed.append(None if index.precomputed is None else index.precomputed.model_copy(update={
            "sidecars": tuple(s.model_copy(update={"name": f"{rel}/{s.name}"}) for s in index.precomputed.sidecars)}))
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
    return first.model_copy(update={"sidecars": tuple(s for p in parts for s in p.sidecars)})


def _first_problem(err: ValidationError) -> str:
    """pydantic's first error as `shards[0]: missing field 'sha256'` or
    `field 'version': input should be 2 (found 1)`."""
    first = err.errors()[0]
    loc = list(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    field_name = loc.pop() if loc and isinstance(loc[-1], str) and first["type"] != "value_error" else None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = message[:1].lower() + message[1:]
    found = "" if first["type"] == "value_error" else f" (found {_shown(first.get('input'))})"  # ours say it
    if field_name is None:
        return f"{where}: {message}{found}" if loc else f"{message}{found}"
    at = f"{where}: " if where else ""
    if first["type"] == "missing":
        return f"{at}missing field '{field_name}'"
    if first["type"] == "extra_forbidden":
        return f"{at}unknown field '{field_name}'"
    return f"{at}field '{field_name}': {message}{found}"


def _shown(value: Any) -> str:
    """A found value for an error line: its repr, cut to 80 characters (containers by type)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
