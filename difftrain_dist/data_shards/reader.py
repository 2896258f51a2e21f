"""Balanced, deterministic, skippable stream of single-bucket batches from one `index.json`.

See `plan.py` for how shards are dealt to readers and how the per-epoch batch quota is computed.
This module reads a reader's units with `tarfile` (streaming, one shard at a time), expands each
sample into its shard's `repeats` copies (copy c > 0 gets the key `SHARD/KEY#c`), shuffles sample *bytes*
through a buffer, groups them by bucket into batches (a batch is emitted when its bucket has
`micro_batch_size` samples), keeps the reader's quota of batches, drops the batches a resumed
stream skips, and decodes only what it yields.

Resume: DataLoader takes batch b of a rank's stream from worker b % K. A stream built with
`start_batch=c` therefore lets DataLoader worker w play the part of worker (w + c) % K of the
unskipped stream, so the DataLoader's first batch is batch c, then c+1, ... exactly as before.
Captions are transformed from (seed, epoch, key) alone, so skipped batches need no replay.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from random import Random
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .buckets import Bucket, bucket_name, parse_bucket
from .captions import CaptionTransform
from .index import ShardIndex
from .plan import ReadPlan, Unit, epoch_rng, slice_of
from .precomputed import collate_precomputed, tar_samples, with_sidecar

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Sample = dict[str, Any]  # {"__key__": str, "jpg": bytes, "txt": bytes, "json": bytes, ...}


class ShardStream(IterableDataset):
    """Infinite stream of batches for one rank; use with `DataLoader(ds, batch_size=None, num_workers=K)`.

    Each item is a dict:
        "pixel_values": float32 Tensor [B, 3, H, W], values in [-1, 1] (RGB, uint8 / 127.5 - 1);
            every sample of a batch is in the same bucket, (W, H) px;
        "bucket": [W, H], px;
        "captions": list[str] of length B (after the caption transform);
        "keys": list[str] of length B, `SHARD/KEY` (shard name as in index.json, tar key),
            `SHARD/KEY#c` for repeat copy c > 0: unique within an epoch, for tracing;
        "epoch": int;
        "batch_in_epoch": int, the rank-level batch index in the epoch (the resume cursor);
        "original_sizes": int64 Tensor [B, 2], (height, width) of each source image in px;
        "crops_top_left": int64 Tensor [B, 2], (top, left) of its centre crop in the resized
            image, px (SDXL's micro-conditioning; see `size_conditioning`);
    and, when the index has a `precomputed` block (see precomputed.py), also
        "latent_parameters": float32 Tensor [B, 2C, h, w], VAE posterior parameters of the pixels;
        "conditioning": {name: float32 Tensor [B, ...]}, `encode_prompts` of the captions as
            stored in the shards (before the caption transform).
    B is `micro_batch_size`. Sidecars are read in lockstep with their shards, so the order,
    batches and skipping are the same with or without them.

    Every rank and every loader worker yields the same number of batches, `batches_per_epoch`
    per rank, the same in every epoch (see plan.py); `start_epoch`/`start_batch` resume from the
    rank-level cursor of a previous stream.

    Args:
        index: a ShardIndex, or the path / file:// URL of index.json or its folder.
        micro_batch_size: samples per batch, B.
        global_rank, world_size: this rank and the number of ranks.
        seed: data-order seed (shard layout, shuffle buffers, caption transforms).
        start_epoch, start_batch: cursor to resume from; start_batch may equal the epoch's batch
            count (meaning: the start of the next epoch).
        shuffle_buffer: samples in each reader's shuffle buffer (0 or 1: no shuffling).
        num_workers: the DataLoader's num_workers (0: read in the main process). The stream
            checks it against `torch.utils.data.get_worker_info()` when iterating.
        caption_dropout: probability in [0, 1] that a caption becomes "" (per sample and epoch).
        shuffle_captions: shuffle comma-separated caption tags (per sample and epoch).
        keep_tokens: leading tags that shuffle_captions keeps in place.
        trigger_word: fills `[trigger]`/`[name]` and is prepended to captions lacking it.
            See captions.CaptionTransform; all of these are deterministic in (seed, epoch, key).
        caption_transforms: one CaptionTransform per shard of the index, in index order (shards of
            several datasets, each read with its own options); replaces the four arguments above.

    Raises:
        ValueError: bad arguments, an unreadable index, too few samples for
            world_size x max(num_workers, 1) readers to get a full single-bucket batch, or
            start_batch past the epoch end. While iterating: a DataLoader whose num_workers
            differs from `num_workers`, or a shard whose contents disagree with index.json.
    """

    def __init__(self, index: ShardIndex | str | os.PathLike[str], *, micro_batch_size: int,
                 global_rank: int, world_size: int, seed: int, start_epoch: int = 0,
                 start_batch: int = 0, shuffle_buffer: int = 64, num_workers: int = 0,
                 caption_dropout: float = 0.0, shuffle_captions: bool = False, keep_tokens: int = 0,
                 trigger_word: str | None = None, caption_transforms: Sequence[CaptionTransform] | None = None):
        super().__init__()
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index)
        _check_int("micro_batch_size", micro_batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("global_rank", global_rank, 0)
        if global_rank >= world_size:
            raise ValueError(f"global_rank: {global_rank} is not below world_size {world_size}")
        for name, value in (("start_epoch", start_epoch), ("start_batch", start_batch),
                            ("shuffle_buffer", shuffle_buffer), ("num_workers", num_workers)):
            _check_int(name, value, 0)
        if not self.index.shards or self.index.num_samples == 0:
            raise ValueError(f"index {self.index.root}: holds no samples")
        if caption_transforms is None:
            caption_transforms = [CaptionTransform(caption_dropout, shuffle_captions, keep_tokens,
                                                   trigger_word or None)] * len(self.index.shards)
        if len(caption_transforms) != len(self.index.shards):
            raise ValueError(f"caption_transforms: {len(caption_transforms)} for {len(self.index.shards)} shards")
        self.captions = list(caption_transforms)
        self.micro_batch_size = micro_batch_size
        self.global_rank = global_rank
        self.world_size = world_size
        self.seed = seed
        self.start_epoch = start_epoch
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self._readers_per_rank = max(num_workers, 1)  # K
        self._bucket_names = self.index.bucket_names
        self._bucket_ids = {name: i for i, name in enumerate(self._bucket_names)}
        self._epoch_counts = self.index.epoch_counts()
        self._plan = ReadPlan(self._epoch_counts, seed=seed, world_size=world_size,
                              num_workers=self._readers_per_rank, micro_batch_size=micro_batch_size)
        self._resume_cursor()  # fail early on a cursor past the epoch end

    def resume_at(self, epoch: int, batch_in_epoch: int) -> None:
        """Start iterating at batch `batch_in_epoch` of `epoch` (a resumed run's data cursor)
        instead of the cursor given at construction; call before iterating.

        Raises:
            ValueError: a negative cursor, or one past the end of the epoch.
        """
        _check_int("start_epoch", epoch, 0)
        _check_int("start_batch", batch_in_epoch, 0)
        self.start_epoch, self.start_batch = epoch, batch_in_epoch
        self._resume_cursor()

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch, all its loader workers together (same every epoch)."""
        return self._readers_per_rank * self._plan.quota

    @property
    def batches_per_reader(self) -> int:
        """Batches each (rank, loader worker) reader yields per epoch."""
        return self._plan.quota

    @property
    def samples_per_reader(self) -> int:
        """Samples each (rank, loader worker) reader yields per epoch."""
        return self._plan.quota * self.micro_batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if k != self._readers_per_rank:
            raise ValueError(f"num_workers: ShardStream was built with num_workers={self.num_workers} "
                             f"but is read with {info.num_workers if info else 0} loader workers; "
                             "pass the DataLoader's num_workers to ShardStream")
        epoch, cursor = self._resume_cursor()
        role = (worker + cursor) % k  # the worker of the unskipped stream this one replays
        reader = self.global_rank * k + role
        skip = max(0, -(-(cursor - role) // k))  # this role's batches before the cursor
        while True:
            yield from self._reader_epoch(epoch, k, role, reader, skip)
            epoch, skip = epoch + 1, 0

    def _resume_cursor(self) -> tuple[int, int]:
        """(epoch, batch) to start from; a cursor at an epoch's end moves to the next epoch."""
        total = self.batches_per_epoch
        if self.start_batch > total:
            raise ValueError(f"start_batch: {self.start_batch} is past the end of epoch "
                             f"{self.start_epoch}, which has {total} batches on this rank")
        if self.start_batch == total:
            return self.start_epoch + 1, 0
        return self.start_epoch, self.start_batch

    def _reader_epoch(self, epoch: int, k: int, role: int, reader: int,
                      skip: int) -> Iterator[dict[str, Any]]:
        """One reader's batches of `epoch`, the first `skip` of them dropped undecoded."""
        units = self._plan.reader_units(epoch, reader)
        rng = epoch_rng("buffer", self.seed, epoch, reader)
        items = _shuffled(self._read_units(units), self.shuffle_buffer, rng)
        quota = self._plan.quota
        count = 0
        for i, (bucket, batch) in enumerate(islice(_bucket_batches(items, self.micro_batch_size), quota)):
            count += 1
            if i >= skip:
                yield self._collate(batch, parse_bucket(self._bucket_names[bucket]), epoch, role + i * k)
        if count != quota:  # cannot happen when the shards match index.json (checked per unit)
            raise ValueError(f"reader {reader} made {count} batches in epoch {epoch}, expected {quota}")

    def _read_units(self, units: list[Unit]) -> Iterator[tuple[Sample, int]]:
        """(sample copy, bucket id) of the units, in tar order, repeats expanded."""
        for unit in units:
            shard = self.index.shards[unit.shard]
            seen = [0] * len(self._bucket_names)
            for sample in self._shard_samples(unit.shard):
                bucket = self._bucket_of(sample, unit.shard)
                key = f"{shard.name}/{sample['__key__']}"
                for copy in range(shard.repeats):
                    ordinal = seen[bucket]
                    seen[bucket] += 1
                    if slice_of(unit.shard, bucket, ordinal, unit.num_slices) == unit.slice_index:
                        yield {**sample, "__key__": f"{key}#{copy}" if copy else key, "__shard__": unit.shard}, bucket
            if seen != self._epoch_counts[unit.shard]:
                info = self.index.shards[unit.shard]
                raise ValueError(f"{self.index.shard_path(unit.shard)}: holds other samples than index.json "
                                 f"says ({info.num_samples} samples, buckets {info.buckets})")

    def _shard_samples(self, shard: int) -> Iterator[Sample]:
        """One shard's samples in tar order, with their sidecar's members when precomputed (the
        sidecar, like the shard, checked against index.json before its first sample)."""
        samples = _read_shard(self.index, shard)
        if self.index.precomputed is None:
            yield from samples
            return
        self.index.verify_sidecar(shard)
        yield from with_sidecar(samples, self.index.sidecar_path(shard), self.index.precomputed.conditioning)

    def _bucket_of(self, sample: Sample, shard: int) -> int:
        """Bucket id of a sample, from its KEY.json ("bucket": [w, h])."""
        try:
            name = bucket_name(tuple(json.loads(sample["json"])["bucket"]))
            return self._bucket_ids[name]
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{self.index.shard_path(shard)}: sample {sample['__key__']} has no KEY.json "
                             f"with a 'bucket' listed in index.json ({self._bucket_names})") from None

    def _collate(self, batch: list[Sample], bucket: Bucket, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        pixels, sizes = [], []
        for sample in batch:
            sizes.append(size_conditioning(sample, bucket))
            image = decode_image(sample)
            if image.shape[:2] != (bucket[1], bucket[0]):
                raise ValueError(f"sample {sample['__key__']}: image is {image.shape[1]}x{image.shape[0]} px, "
                                 f"but KEY.json puts it in bucket {bucket_name(bucket)}")
            pixels.append(image)
        extra = ({} if self.index.precomputed is None
                 else collate_precomputed(batch, self.index.precomputed.conditioning))
        return {
            "pixel_values": to_pixel_values(np.stack(pixels)),
            "bucket": list(bucket),
            "captions": [self.captions[s["__shard__"]](s["txt"].decode("utf-8"), seed=self.seed, epoch=epoch,
                                                        key=s["__key__"]) for s in batch],
            "keys": [s["__key__"] for s in batch],
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "original_sizes": torch.tensor([size[0] for size in sizes], dtype=torch.int64),
            "crops_top_left": torch.tensor([size[1] for size in sizes], dtype=torch.int64),
            **extra,
        }


def size_conditioning(sample: Sample, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) of the source image, (top, left) of the crop), in px.

    The source size comes from KEY.json's "width"/"height" (as displayed, written by
    `shards build`). The crop is where the bucket's centre crop starts in the image scaled to
    cover the bucket (`images.fit_to_bucket`), the coordinates diffusers'
    train_text_to_image_sdxl.py passes as `crops_coords_top_left`. A sample without sizes
    (a tar from elsewhere) counts as uncropped at the bucket size.
    """
    width, height = bucket
    try:
        meta = json.loads(sample["json"])
        source_w, source_h = int(meta["width"]), int(meta["height"])
    except (KeyError, TypeError, ValueError):
        return (height, width), (0, 0)
    if source_w <= 0 or source_h <= 0:
        return (height, width), (0, 0)
    scale = max(width / source_w, height / source_h)
    top = max(0, round((source_h * scale - height) / 2))
    left = max(0, round((source_w * scale - width) / 2))
    return (source_h, source_w), (top, left)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, found {value!r}")


def _read_shard(index: ShardIndex, shard: int) -> Iterator[Sample]:
    """Samples of one tar in order: members grouped by key (webdataset's base_plus_ext).

    Before the first sample the whole shard is hashed and compared with index.json
    (`ShardIndex.verify_shard`), so no sample of a corrupt or truncated shard is ever yielded;
    the tar is then read a second time (from the page cache, as a rule) to parse it.

    Raises:
        ValueError: naming the shard file: truncated or corrupt (size / sha256 against
            index.json), not a readable tar, or a sample without an image or caption.
    """
    path = index.shard_path(shard)
    index.verify_shard(shard)
    for sample in tar_samples(path):
        yield _checked({k if k == "__key__" else k.lower(): v for k, v in sample.items()}, path)


def read_shard_images(index: ShardIndex, shard: int) -> Iterator[tuple[str, np.ndarray, str]]:
    """`(KEY, image, caption)` of every sample of shard `shard`, in tar order: the image decoded
    exactly as the stream decodes it (uint8 [H, W, 3] RGB, see `decode_image`), the caption as
    stored (UTF-8, no caption transform). What `shards precompute` encodes.

    Raises:
        ValueError: as `ShardStream` does for a truncated or corrupt shard (checked first).
    """
    for sample in _read_shard(index, shard):
        yield sample["__key__"], decode_image(sample), sample["txt"].decode("utf-8")


def _checked(sample: Sample, path: os.PathLike[str]) -> Sample:
    if "txt" not in sample or not any(k in sample for k in _IMAGE_KEYS):
        raise ValueError(f"{path}: sample {sample['__key__']} lacks an image or a .txt caption "
                         f"(has {sorted(k for k in sample if k != '__key__')})")
    return sample


def _shuffled(items: Iterator[Any], size: int, rng: Random) -> Iterator[Any]:
    """Deterministic buffer shuffle: fill `size`, then emit a random slot and refill it."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _bucket_batches(items: Iterator[tuple[Sample, int]], size: int) -> Iterator[tuple[int, list[Sample]]]:
    """(bucket id, batch) each time a bucket has gathered `size` samples; leftovers are dropped."""
    pending: dict[int, list[Sample]] = {}
    for sample, bucket in items:
        batch = pending.setdefault(bucket, [])
        batch.append(sample)
        if len(batch) == size:
            yield bucket, batch
            pending[bucket] = []


def decode_image(sample: Sample) -> np.ndarray:
    """Image bytes → uint8 [H, W, 3] RGB."""
    data = next(sample[k] for k in _IMAGE_KEYS if k in sample)
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def to_pixel_values(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1] (numpy: no torch thread pool per batch)."""
    scaled = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(scaled))
