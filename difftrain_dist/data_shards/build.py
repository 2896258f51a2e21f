"""Folder of images + captions (ai-toolkit layout) → WebDataset shards + `index.json`.

Each kept input becomes three tar members written by `webdataset.ShardWriter`:

- `KEY.jpg`  the image as displayed (EXIF orientation applied), 8-bit RGB, scaled to cover its
  bucket with LANCZOS and centre-cropped, JPEG quality 95;
- `KEY.txt`  the caption, UTF-8;
- `KEY.json` `{"width", "height"}` of the source as displayed (px), `"bucket": [w, h]` (px),
  `"source"` (posix path relative to the source folder), `"sha256"` (hex, of the source file).

KEY is the kept input's running number, zero-padded to 9 digits, in the order the folder is walked
(sorted names, a folder's files before its sub-folders), so a rebuild gives the same keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, encode_jpeg, fit_to_bucket, open_oriented, to_rgb
from .index import ShardIndex, ShardInfo, SkippedInput, sha256_file

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"


class _SkipInput(Exception):
    """Raised while preparing one input; the message is the reason recorded in index.json."""


def build_shards(
    src: Path,
    out: Path,
    *,
    resolution: int,
    caption_ext: str = ".txt",
    default_caption: str | None = None,
    samples_per_shard: int = 1000,
) -> ShardIndex:
    """Convert an image + caption folder into `out/shard-%06d.tar` and `out/index.json`.

    Args:
        src: folder walked recursively; images are .jpg/.jpeg/.png/.webp/.bmp (any case), each
            with a same-stem caption file `caption_ext` beside it. Hidden files/folders are ignored.
        out: output folder; created if missing. Must not already hold shards or an index.
        resolution: side of the square bucket, px (every image becomes resolution x resolution).
        caption_ext: caption file extension, with the dot.
        default_caption: caption for images without a caption file; None skips those images.
        samples_per_shard: samples per tar (the last one may hold fewer).

    Returns:
        The index that was written (its `root` is `out`).

    Raises:
        ValueError: `src` is not a folder, `out` is a file or already holds shards / index.json,
            or an argument is out of range. Bad inputs never raise: they are listed in
            `index.skipped` with a reason and logged as warnings.
    """
    src, out = Path(src), Path(out)
    _check_args(src, out, resolution, caption_ext, samples_per_shard)
    out.mkdir(parents=True, exist_ok=True)
    bucket = (resolution, resolution)
    skipped: list[SkippedInput] = []
    counts: Counter[str] = Counter()
    writer: wds.ShardWriter | None = None
    try:
        for path, problem in _walk_inputs(src, out, caption_ext):
            rel = path.relative_to(src).as_posix()
            try:
                if problem:
                    raise _SkipInput(problem)
                sample = _prepare_sample(path, rel, bucket, caption_ext, default_caption)
            except _SkipInput as skip:
                skipped.append(SkippedInput(rel, str(skip)))
                log.warning("skipping %s: %s", rel, skip)
                continue
            if writer is None:  # opened lazily: ShardWriter creates a shard file on construction
                writer = wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=samples_per_shard,
                                         verbose=0, mtime=0.0)
            sample["__key__"] = f"{sum(counts.values()):09d}"
            writer.write(sample)
            counts[Path(writer.fname).name] += 1
    finally:
        if writer is not None:
            writer.close()
    index = ShardIndex(
        resolution=resolution,
        num_samples=sum(counts.values()),
        shards=[ShardInfo(name, n, sha256_file(out / name)) for name, n in sorted(counts.items())],
        buckets={f"{bucket[0]}x{bucket[1]}": sum(counts.values())} if counts else {},
        skipped=skipped,
    )
    index.save(out)
    log.info("wrote %d samples in %d shards to %s; skipped %d inputs",
             index.num_samples, len(index.shards), out, len(skipped))
    return index


def _check_args(src: Path, out: Path, resolution: int, caption_ext: str, samples_per_shard: int) -> None:
    if not src.is_dir():
        raise ValueError(f"src {src}: not a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: exists and is not a folder")
    if out.is_dir():
        existing = sorted(p.name for p in out.iterdir() if p.name == "index.json" or
                          (p.name.startswith("shard-") and p.name.endswith(".tar")))
        if existing:
            raise ValueError(f"out {out}: already holds {', '.join(existing[:3])}"
                             f"{' ...' if len(existing) > 3 else ''}; use an empty folder")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive int (px), found {resolution!r}")
    if not caption_ext.startswith(".") or len(caption_ext) < 2:
        raise ValueError(f"caption_ext: expected an extension starting with '.', found {caption_ext!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected a positive int, found {samples_per_shard!r}")


def _walk_inputs(src: Path, out: Path, caption_ext: str) -> Iterator[tuple[Path, str | None]]:
    """Yield (file, problem) in sorted order; problem is None for images, a reason for other files.

    Caption files, hidden entries and the `out` folder (if inside `src`) are not inputs.
    """
    out_resolved = out.resolve()
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d).resolve() != out_resolved)
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or path.suffix == caption_ext:
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                yield path, None
            else:
                allowed = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
                yield path, f"not an image input (extension {path.suffix or 'none'!r}, expected {allowed})"


def _read_caption(image: Path, caption_ext: str, default_caption: str | None) -> str:
    caption_path = image.with_suffix(caption_ext)
    if not caption_path.is_file():
        if default_caption is None:
            raise _SkipInput(f"no caption file {caption_path.name} and no default_caption")
        return default_caption
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise _SkipInput(f"caption file {caption_path.name} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _prepare_sample(path: Path, rel: str, bucket: tuple[int, int], caption_ext: str,
                    default_caption: str | None) -> dict[str, Any]:
    """Caption first (cheap), then decode → orient → RGB → fit → JPEG. Raises _SkipInput."""
    caption = _read_caption(path, caption_ext, default_caption)
    data = path.read_bytes()
    if not data:
        raise _SkipInput("empty file (0 bytes)")
    try:
        img = open_oriented(data)
        width, height = img.size
        jpeg = encode_jpeg(fit_to_bucket(to_rgb(img), bucket))
    except DECODE_ERRORS as exc:
        raise _SkipInput(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    meta = {"width": width, "height": height, "bucket": list(bucket), "source": rel,
            "sha256": hashlib.sha256(data).hexdigest()}
    return {"jpg": jpeg, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}
