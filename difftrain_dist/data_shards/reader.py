"""Balanced, deterministic, skippable stream of batches from the shards of one `index.json`.

See `plan.py` for how shards are dealt to readers. This module reads a reader's units with
`tarfile` (streaming, one shard at a time), shuffles sample *bytes* through a buffer, keeps the
reader's quota, drops the samples a resumed stream skips, and decodes only what it yields.

Resume: DataLoader takes batch b of a rank's stream from worker b % K. A stream built with
`start_batch=c` therefore lets DataLoader worker w play the part of worker (w + c) % K of the
unskipped stream, so the DataLoader's first batch is batch c, then c+1, ... exactly as before.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from itertools import islice
from random import Random
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from .index import ShardIndex
from .plan import Unit, epoch_rng, epoch_units, reader_quota

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Sample = dict[str, Any]  # {"__key__": str, "jpg": bytes, "txt": bytes, ...}


class ShardStream(IterableDataset):
    """Infinite stream of batches for one rank; use with `DataLoader(ds, batch_size=None, num_workers=K)`.

    Each item is a dict:
        "pixel_values": float32 Tensor [B, 3, H, W], values in [-1, 1] (RGB, uint8 / 127.5 - 1);
        "captions": list[str] of length B;
        "keys": list[str] of length B (tar keys, for tracing);
        "epoch": int;
        "batch_in_epoch": int, the rank-level batch index in the epoch (the resume cursor).
    B is `micro_batch_size`; H = W = the index's resolution.

    Every rank and every loader worker yields the same number of batches in every epoch (see
    plan.py); `start_epoch`/`start_batch` resume from the rank-level cursor of a previous stream.

    Args:
        index: a ShardIndex, or the path / file:// URL of index.json or its folder.
        micro_batch_size: samples per batch, B.
        global_rank, world_size: this rank and the number of ranks.
        seed: data-order seed (shard permutation and shuffle buffers).
        start_epoch, start_batch: cursor to resume from; start_batch may equal the epoch's batch
            count (meaning: the start of the next epoch).
        shuffle_buffer: samples in each reader's shuffle buffer (0 or 1: no shuffling).
        num_workers: the DataLoader's num_workers (0: read in the main process). The stream
            checks it against `torch.utils.data.get_worker_info()` when iterating.

    Raises:
        ValueError: bad arguments, an unreadable index, too few samples for
            world_size x max(num_workers, 1) x micro_batch_size, or start_batch past the epoch end.
            While iterating: a DataLoader whose num_workers differs from `num_workers`, or a shard
            whose contents disagree with index.json.
    """

    def __init__(self, index: ShardIndex | str | os.PathLike[str], *, micro_batch_size: int,
                 global_rank: int, world_size: int, seed: int, start_epoch: int = 0,
                 start_batch: int = 0, shuffle_buffer: int = 64, num_workers: int = 0):
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
        self.micro_batch_size = micro_batch_size
        self.global_rank = global_rank
        self.world_size = world_size
        self.seed = seed
        self.start_epoch = start_epoch
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self._readers_per_rank = max(num_workers, 1)  # K
        self._quota = reader_quota(self.index.shard_sizes, world_size=world_size,
                                   num_workers=self._readers_per_rank, micro_batch_size=micro_batch_size)
        self._resume_cursor()  # fail early on a cursor past the epoch end

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch, all its loader workers together (same every epoch)."""
        return self._readers_per_rank * self._quota // self.micro_batch_size

    @property
    def samples_per_reader(self) -> int:
        """Samples each (rank, loader worker) reader yields per epoch."""
        return self._quota

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
        units = epoch_units(self.index.shard_sizes, seed=self.seed, epoch=epoch,
                            num_readers=self.world_size * k)[reader]
        quota = self._quota
        rng = epoch_rng("buffer", self.seed, epoch, reader)
        samples = islice(_shuffled(self._read_units(units), self.shuffle_buffer, rng), quota)
        for i in range(quota // self.micro_batch_size):
            batch = list(islice(samples, self.micro_batch_size))
            if i < skip:
                continue
            yield _collate(batch, epoch, role + i * k)

    def _read_units(self, units: list[Unit]) -> Iterator[Sample]:
        for unit in units:
            count = 0
            for offset, sample in enumerate(_read_shard(self.index, unit.shard)):
                if offset % unit.num_slices == unit.slice_index:
                    count += 1
                    yield sample
            if count != unit.num_samples:
                info = self.index.shards[unit.shard]
                raise ValueError(f"{self.index.shard_path(unit.shard)}: holds a different number of "
                                 f"samples than index.json says ({info.num_samples})")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, found {value!r}")


def _read_shard(index: ShardIndex, shard: int) -> Iterator[Sample]:
    """Samples of one tar in order: members grouped by key (webdataset's base_plus_ext)."""
    path = index.shard_path(shard)
    current: Sample | None = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield _checked(current, path)
                current = None
            current = current or {"__key__": key}
            current[ext.lower()] = tar.extractfile(member).read()
    if current is not None:
        yield _checked(current, path)


def _checked(sample: Sample, path: os.PathLike[str]) -> Sample:
    if "txt" not in sample or not any(k in sample for k in _IMAGE_KEYS):
        raise ValueError(f"{path}: sample {sample['__key__']} lacks an image or a .txt caption "
                         f"(has {sorted(k for k in sample if k != '__key__')})")
    return sample


def _shuffled(items: Iterator[Sample], size: int, rng: Random) -> Iterator[Sample]:
    """Deterministic buffer shuffle: fill `size`, then emit a random slot and refill it."""
    if size <= 1:
        yield from items
        return
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _decode(sample: Sample) -> torch.Tensor:
    """Image bytes → float32 [3, H, W] in [-1, 1]."""
    data = next(sample[k] for k in _IMAGE_KEYS if k in sample)
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _collate(batch: list[Sample], epoch: int, batch_in_epoch: int) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([_decode(s) for s in batch]),
        "captions": [s["txt"].decode("utf-8") for s in batch],
        "keys": [s["__key__"] for s in batch],
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
    }
