"""Which samples each reader reads in an epoch — computed from shard sizes alone (no I/O).

A reader is one (rank, DataLoader worker) pair; there are R = world_size * K of them, and reader
`global_rank * K + worker` is the reader's global id. Per epoch:

1. the shards are permuted by a RNG keyed by (seed, epoch);
2. if there are fewer shards than readers, each shard is cut into n = ceil(R / num_shards) slices
   (slice j keeps the samples whose offset in the shard is ≡ j mod n), so there are >= R units;
3. units are dealt round-robin to readers;
4. every reader keeps only `quota` samples: the smallest count any reader can get in any epoch,
   rounded down to a multiple of `micro_batch_size` — so every reader yields exactly the same
   number of batches, and that number is the same every epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """Slice `slice_index` of `num_slices` of shard `shard` (index into ShardIndex.shards)."""

    shard: int
    slice_index: int
    num_slices: int
    num_samples: int


def epoch_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded from `parts` (str seeds hash with sha512: same in every process)."""
    return random.Random("/".join(str(p) for p in parts))


def epoch_units(shard_sizes: Sequence[int], *, seed: int, epoch: int, num_readers: int) -> list[list[Unit]]:
    """Units of every reader for `epoch`: element r is reader r's units, in reading order.

    Raises:
        ValueError: no shards, or num_readers < 1.
    """
    if not shard_sizes:
        raise ValueError("the shard index lists no shards")
    if num_readers < 1:
        raise ValueError(f"num_readers: expected >= 1, found {num_readers}")
    order = list(range(len(shard_sizes)))
    epoch_rng("shards", seed, epoch).shuffle(order)
    n = num_slices(len(order), num_readers)
    units = [Unit(s, j, n, len(range(j, shard_sizes[s], n))) for s in order for j in range(n)]
    return [units[r::num_readers] for r in range(num_readers)]


def num_slices(num_shards: int, num_readers: int) -> int:
    """Slices per shard: 1 when there are at least as many shards as readers, else ceil(R / shards)."""
    return 1 if num_shards >= num_readers else math.ceil(num_readers / num_shards)


def reader_quota(shard_sizes: Sequence[int], *, world_size: int, num_workers: int,
                 micro_batch_size: int) -> int:
    """Samples every reader keeps in every epoch (a positive multiple of `micro_batch_size`).

    `num_workers` is K, the readers per rank (DataLoader workers, 1 when reading in-process).
    The unit sizes do not depend on the epoch, only who gets which unit does, and every reader
    gets at least floor(units / R) units; so the sum of the floor(units / R) smallest units is the
    smallest count any reader can get in any epoch (it is reached when the shard permutation
    deals those units to one reader). Truncating to it gives the same batch count every epoch.

    Raises:
        ValueError: that smallest count is below `micro_batch_size`, saying how many samples the
            dataset needs.
    """
    readers = world_size * num_workers
    if not shard_sizes:
        raise ValueError("the shard index lists no shards")
    n = num_slices(len(shard_sizes), readers)
    unit_sizes = sorted(len(range(j, size, n)) for size in shard_sizes for j in range(n))
    smallest = sum(unit_sizes[: len(unit_sizes) // readers])
    quota = smallest - smallest % micro_batch_size
    if quota == 0:
        raise ValueError(
            f"too few samples: the smallest of {readers} readers (world_size {world_size} x "
            f"{num_workers} loader workers) can get {smallest} samples in an epoch, fewer than "
            f"micro_batch_size {micro_batch_size}. Every reader needs a full batch, so the data "
            f"needs at least {readers * micro_batch_size} samples in evenly sized shards (it has "
            f"{sum(shard_sizes)} in {len(shard_sizes)} shards); use fewer loader workers, a smaller "
            "micro_batch_size, or more data"
        )
    return quota
