"""Image folders (ai-toolkit layout) and existing WebDataset / img2dataset tars → shards + `index.json`.

Every kept input becomes, for each training resolution, one sample of three tar members written by
`webdataset.ShardWriter`:

- `KEY.jpg`  the image as displayed (EXIF orientation applied), 8-bit RGB, scaled to cover its
  aspect-ratio bucket (see buckets.py) with LANCZOS and centre-cropped, JPEG quality 95;
- `KEY.txt`  the caption, UTF-8 (`[trigger]` / `[name]` replaced when a trigger word is given);
- `KEY.json` `{"width", "height"}` of the source as displayed (px), `"bucket": [w, h]` (px),
  `"resolution"` (px), `"source"` (see sources.py), `"sha256"` (hex, of the source image bytes),
  and img2dataset's `"url"` when the input had one.

KEY is the sample's running number, zero-padded to 9 digits, in input order (sources in the order
given; see sources.py for the order inside one), resolutions in the order given, so a rebuild gives
the same keys. `num_repeats` is not written as copies: it is stored per shard in index.json and the
reader yields each sample that many times per epoch (no extra disk, and the copies of one image
land in different batches and, with few shards, on different readers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from .buckets import (
    DEFAULT_BUCKET_STEP,
    DEFAULT_MAX_ASPECT,
    Bucket,
    bucket_name,
    candidate_buckets,
    check_bucket_args,
    choose_bucket,
    parse_bucket,
)
from .captions import fill_placeholders
from .files import sha256_file
from .images import DECODE_ERRORS, encode_jpeg, fit_to_bucket, open_oriented, to_rgb
from .index import ShardIndex, ShardInfo, SkippedInput, UpscaledInput
from .sources import InputItem, SkipInput, error_text, folder_missing_captions, iter_inputs, resolve_sources

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
MISSING_CAPTION = ("skip", "default", "error")
SMALL_IMAGES = ("upscale", "skip")
MAX_LISTED = 20


@dataclass(frozen=True)
class BuildOptions:
    """The validated options of one build (recorded in index.json's "build")."""

    resolutions: tuple[int, ...]
    bucket_step: int
    max_aspect: float
    caption_ext: str
    default_caption: str | None
    missing_caption: str
    trigger_word: str | None
    num_repeats: int
    small_images: str


def build_shards(
    src: str | Path | Sequence[str | Path], out: Path, *, resolution: int | Sequence[int],
    caption_ext: str = ".txt", default_caption: str | None = None, missing_caption: str | None = None,
    trigger_word: str | None = None, num_repeats: int = 1, small_images: str = "upscale",
    bucket_step: int = DEFAULT_BUCKET_STEP, max_aspect: float = DEFAULT_MAX_ASPECT,
    samples_per_shard: int = 1000, allow_shell_urls: bool = False,
) -> ShardIndex:
    """Convert image folders and/or tars into `out/shard-%06d.tar` and `out/index.json`.

    Args:
        src: a folder, a tar path or URL, or a list of those (see sources.py).
        out: output folder; created if missing. Must not already hold shards or an index.
        resolution: training resolution(s), px; every image is written once per resolution, in the
            bucket chosen among that resolution's candidates (see buckets.py).
        caption_ext: caption file extension, with the dot (folder sources).
        default_caption: caption for inputs without one (used when missing_caption is "default").
        missing_caption: "skip" (report and leave out), "default" (use default_caption) or "error" (fail,
            listing every such input; folders are checked before anything is written). None means
            "default" when default_caption is given, else "skip".
        trigger_word: replaces `[trigger]` and `[name]` in captions; None leaves them for the reader.
        num_repeats: times the reader yields each of these samples per epoch (ai-toolkit's `num_repeats`),
            stored per shard in index.json.
        small_images: "upscale" images smaller than their bucket (listed in `index.upscaled`), or "skip"
            them (listed in `index.skipped`); per resolution.
        bucket_step, max_aspect: bucket size step (px) and largest long/short side ratio.
        samples_per_shard: samples per tar (the last one may hold fewer).
        allow_shell_urls: allow `pipe:` sources, which run a shell command.

    Returns:
        The index that was written (its `root` is `out`).

    Raises:
        ValueError: an option is out of range (naming it), a source is missing or refused, `out` is a file
            or already holds shards / index.json, or missing_caption is "error" and some inputs have no
            caption (no index is written then). Bad inputs never raise: they are listed in
            `index.skipped` with a kind and reason, and logged as warnings. Reasons hold no memory
            addresses or times: the same inputs and options give the same index.json bytes.
    """
    out = Path(out)
    opts = _options(resolution, caption_ext, default_caption, missing_caption, trigger_word,
                    num_repeats, small_images, bucket_step, max_aspect, samples_per_shard)
    _check_out(out)
    sources = resolve_sources(src, allow_shell_urls=allow_shell_urls)
    _check_folder_captions(sources, out, opts)
    out.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(out, samples_per_shard)
    missing: list[str] = []
    try:
        skipped, upscaled = _write_samples(iter_inputs(sources, out, caption_ext), opts, sink, missing)
    finally:
        sink.close()
    if missing:  # only tar inputs get here: folders were checked up front
        sink.discard()
        raise _missing_caption_error(missing)
    return _write_index(out, sink, skipped, upscaled, opts)


def _write_samples(items, opts: BuildOptions, sink: _ShardSink,
                   missing: list[str]) -> tuple[list[SkippedInput], list[UpscaledInput]]:
    """Prepare every input and write its samples; returns what was skipped and what upscaled
    (each also logged). Inputs without a caption under missing_caption "error" go to `missing`."""
    skipped: list[SkippedInput] = []
    upscaled: list[UpscaledInput] = []
    for item in items:
        samples, skips, upscales = _prepare_all(item, opts, missing)
        for skip in skips:
            skipped.append(SkippedInput(source=item.source, reason=skip.reason, kind=skip.kind))
            log.warning("skipping %s: %s", item.source, skip.reason)
        for res, reason in upscales:
            upscaled.append(UpscaledInput(source=item.source, resolution=res, reason=reason))
            log.info("upscaling %s: %s", item.source, reason)
        for sample, bucket in samples:
            sink.write(sample, bucket)
    return skipped, upscaled


def _options(resolution, caption_ext, default_caption, missing_caption, trigger_word, num_repeats,
             small_images, bucket_step, max_aspect, samples_per_shard) -> BuildOptions:
    resolutions = (resolution,) if isinstance(resolution, int) else tuple(resolution)
    check_bucket_args(resolutions, bucket_step, max_aspect)
    if not caption_ext.startswith(".") or len(caption_ext) < 2:
        raise ValueError(f"caption_ext: expected an extension starting with '.', found {caption_ext!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected a positive int, found {samples_per_shard!r}")
    if not isinstance(num_repeats, int) or isinstance(num_repeats, bool) or num_repeats < 1:
        raise ValueError(f"num_repeats: expected an int >= 1 (times per epoch), found {num_repeats!r}")
    if small_images not in SMALL_IMAGES:
        raise ValueError(f"small_images: expected one of {SMALL_IMAGES}, found {small_images!r}")
    if missing_caption is None:
        missing_caption = "skip" if default_caption is None else "default"
    if missing_caption not in MISSING_CAPTION:
        raise ValueError(f"missing_caption: expected one of {MISSING_CAPTION}, found {missing_caption!r}")
    if (missing_caption == "default") != (default_caption is not None):
        raise ValueError(f"missing_caption: {missing_caption!r} with default_caption={default_caption!r}; "
                         "use 'default' together with a default_caption, 'skip' or 'error' without one")
    return BuildOptions(resolutions, bucket_step, float(max_aspect), caption_ext, default_caption,
                        missing_caption, trigger_word or None, num_repeats, small_images)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: exists and is not a folder")
    if out.is_dir():
        existing = sorted(p.name for p in out.iterdir() if p.name == "index.json" or
                          (p.name.startswith("shard-") and p.name.endswith(".tar")))
        if existing:
            raise ValueError(f"out {out}: already holds {', '.join(existing[:3])}"
                             f"{' ...' if len(existing) > 3 else ''}; use an empty folder")


def _check_folder_captions(sources, out: Path, opts: BuildOptions) -> None:
    """Under missing_caption "error": fail before writing anything when a folder input lacks its caption."""
    if opts.missing_caption == "error":
        missing = [m for s in sources if s.kind == "folder"
                   for m in folder_missing_captions(Path(s.location), out, opts.caption_ext)]
        if missing:
            raise _missing_caption_error(missing)


def _missing_caption_error(missing: list[str]) -> ValueError:
    shown = ", ".join(missing[:MAX_LISTED]) + (f" and {len(missing) - MAX_LISTED} more"
                                               if len(missing) > MAX_LISTED else "")
    return ValueError(f"missing_caption is 'error' and {len(missing)} input(s) have no caption: {shown}. "
                      "Add caption files, or set missing_caption to 'skip', or give a default_caption")


def _prepare_all(item: InputItem, opts: BuildOptions, missing: list[str]
                 ) -> tuple[list[tuple[dict[str, Any], Bucket]], list[SkipInput], list[tuple[int, str]]]:
    """The samples (one per resolution) of one input, the reasons for any left out, and
    (resolution, reason) for each one upscaled to its bucket."""
    if item.skip is not None:
        return [], [item.skip], []
    try:
        data, caption = item.load()
        caption = _caption(item, caption, opts, missing)
        if not data:
            raise SkipInput("empty", "empty file (0 bytes)")
        try:
            img = to_rgb(open_oriented(data))
        except DECODE_ERRORS as exc:
            raise SkipInput("decode", f"cannot decode image: {error_text(exc)}") from exc
    except SkipInput as skip:
        return [], [skip], []
    width, height = img.size
    base = {"width": width, "height": height, "source": item.source,
            "sha256": hashlib.sha256(data).hexdigest(), **item.meta}
    samples, skips, upscales = [], [], []
    for res in opts.resolutions:
        bucket = choose_bucket(width, height, candidate_buckets(res, opts.bucket_step, opts.max_aspect))
        if width < bucket[0] or height < bucket[1]:
            small = f"smaller than its bucket at resolution {res}: {width}x{height} px < {bucket_name(bucket)}"
            if opts.small_images == "skip":
                skips.append(SkipInput("small_image", f"{small} (small_images: skip)"))
                continue
            scale = max(bucket[0] / width, bucket[1] / height)  # as fit_to_bucket scales
            upscales.append((res, f"{small}, upscaled {scale:.2f}x (small_images: upscale)"))
        meta = {**base, "bucket": list(bucket), "resolution": res}
        samples.append(({"jpg": encode_jpeg(fit_to_bucket(img, bucket)), "txt": caption.encode("utf-8"),
                         "json": json.dumps(meta).encode("utf-8")}, bucket))
    return samples, skips, upscales


def _caption(item: InputItem, caption: str | None, opts: BuildOptions, missing: list[str]) -> str:
    if caption is None:
        if opts.missing_caption == "error":
            missing.append(item.source)
            raise SkipInput("no_caption", f"no {item.caption_hint} (missing_caption: error)")
        if opts.missing_caption == "skip":
            raise SkipInput("no_caption", f"no {item.caption_hint} and no default_caption")
        caption = opts.default_caption
    return fill_placeholders(caption, opts.trigger_word) if opts.trigger_word else caption


class _ShardSink:
    """Writes samples through webdataset.ShardWriter, counting samples per shard and bucket."""

    def __init__(self, out: Path, samples_per_shard: int):
        self.out, self.samples_per_shard = out, samples_per_shard
        self.writer: wds.ShardWriter | None = None
        self.counts: dict[str, Counter[str]] = {}
        self.total = 0

    def write(self, sample: dict[str, Any], bucket: Bucket) -> None:
        if self.writer is None:  # opened lazily: ShardWriter creates a shard file on construction
            # An int mtime: tarfile writes a float one into an extra pax header per member (1 KiB more
            # to store, and twice the header parsing when reading).
            self.writer = wds.ShardWriter(str(self.out / SHARD_PATTERN), maxcount=self.samples_per_shard,
                                          verbose=0, mtime=0)
        self.writer.write({"__key__": f"{self.total:09d}", **sample})
        self.total += 1
        self.counts.setdefault(Path(self.writer.fname).name, Counter())[bucket_name(bucket)] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def discard(self) -> None:
        """Remove every shard written (a build that fails leaves no partial output behind)."""
        for name in self.counts:
            (self.out / name).unlink(missing_ok=True)
        self.counts.clear()


def _write_index(out: Path, sink: _ShardSink, skipped: list[SkippedInput], upscaled: list[UpscaledInput],
                 opts: BuildOptions) -> ShardIndex:
    shards = [ShardInfo(name=name, num_samples=sum(c.values()), sha256=sha256_file(out / name),
                        buckets={b: c[b] for b in sorted(c, key=parse_bucket)}, repeats=opts.num_repeats,
                        num_bytes=(out / name).stat().st_size) for name, c in sorted(sink.counts.items())]
    histogram: Counter[str] = Counter()
    for shard in shards:
        histogram.update(shard.buckets)
    index = ShardIndex(resolutions=list(opts.resolutions), num_samples=sink.total, shards=shards,
                       buckets={b: histogram[b] for b in sorted(histogram, key=parse_bucket)}, skipped=skipped,
                       upscaled=upscaled,
                       build={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()})
    index.save(out)
    log.info("wrote %d samples in %d shards to %s; skipped %d inputs, upscaled %d samples",
             index.num_samples, len(index.shards), out, len(skipped), len(upscaled))
    return index
