"""Which samples each reader reads in an epoch, and how many batches — from index.json alone (no I/O).

A reader is one (rank, DataLoader worker) pair; there are R = world_size * K of them, and reader
`global_rank * K + worker` is the reader's global id. Batches hold samples of one bucket only.

1. Units. With at least R shards every shard is one unit. With fewer, each shard is cut into
   n = ceil(R / num_shards) slices, so there are >= R units. Slices are cut per bucket: the i-th
   sample copy of bucket b in shard s (each sample counted `repeats` times, in tar order) belongs to
   slice (i + s + b) mod n. A unit's per-bucket counts follow from the shard's per-bucket counts.
2. Layouts. Layout v permutes the units with an RNG keyed by (seed, v) and deals them greedily,
   each to the group holding the fewest samples so far (ties: fewest units, then the lowest
   group), into R groups.
3. Epoch e uses layout e mod LAYOUT_CYCLE; its groups go to readers through a permutation keyed by
   (seed, e), and each reader reads its units in an order keyed by (seed, e, reader).
4. Quota. A reader batches its samples per bucket, so from per-bucket counts c_b it makes
   sum_b floor(c_b / B) batches whatever their order. The quota is the smallest such number over
   the groups of all LAYOUT_CYCLE layouts: every reader in every epoch can make at least that many
   and makes exactly that many, so every rank and loader worker yields the same number of batches,
   the same in every epoch (so the resume cursor and `TrainState.advance` need one number).

Repeating layouts every LAYOUT_CYCLE epochs is the price of a constant batch count: with a layout
per epoch the worst epoch over an unbounded number of epochs could not be computed.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LAYOUT_CYCLE = 16
"""Distinct unit-to-group layouts (epochs); the quota is the worst group over all of them."""


@dataclass(frozen=True)
class Unit:
    """Slice `slice_index` of `num_slices` of shard `shard` (index into ShardIndex.shards).

    `counts[b]` is the number of sample copies of bucket b (ShardIndex.bucket_names order) the
    unit yields per epoch, repeats included.
    """

    shard: int
    slice_index: int
    num_slices: int
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        """Sample copies per epoch, all buckets."""
        return sum(self.counts)


def epoch_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded from `parts` (str seeds hash with sha512: same in every process)."""
    return random.Random("/".join(str(p) for p in parts))


def num_slices(num_shards: int, num_readers: int) -> int:
    """Slices per shard: 1 when there are at least as many shards as readers, else ceil(R / shards)."""
    return 1 if num_shards >= num_readers else math.ceil(num_readers / num_shards)


def slice_of(shard: int, bucket: int, ordinal: int, slices: int) -> int:
    """The slice holding copy number `ordinal` (0-based, per shard and bucket) of bucket `bucket`."""
    return (ordinal + shard + bucket) % slices


def make_units(epoch_counts: Sequence[Sequence[int]], num_readers: int) -> list[Unit]:
    """Units of every shard, shard-major. `epoch_counts[s][b]`: copies of bucket b in shard s per epoch."""
    n = num_slices(len(epoch_counts), num_readers)
    return [Unit(s, j, n, tuple(len(range((j - s - b) % n, count, n)) for b, count in enumerate(row)))
            for s, row in enumerate(epoch_counts) for j in range(n)]


class ReadPlan:
    """The units every reader reads in every epoch and the batch quota (see the module docstring).

    Args:
        epoch_counts: [num_shards][num_buckets] sample copies per epoch (`ShardIndex.epoch_counts()`).
        seed: data-order seed.
        world_size, num_workers: ranks and readers per rank (K >= 1); R = world_size * K.
        micro_batch_size: samples per batch, B.

    Raises:
        ValueError: no shards, or some reader could get no full batch in some layout (the message
            says how many samples the data needs).
    """

    def __init__(self, epoch_counts: Sequence[Sequence[int]], *, seed: int, world_size: int,
                 num_workers: int, micro_batch_size: int):
        if not epoch_counts:
            raise ValueError("the shard index lists no shards")
        self.seed = seed
        self.num_readers = world_size * num_workers
        self.micro_batch_size = micro_batch_size
        self.units = make_units(epoch_counts, self.num_readers)
        self._counts = np.array([u.counts for u in self.units], dtype=np.int64).reshape(len(self.units), -1)
        self._layouts: dict[int, list[list[int]]] = {}
        self.quota = min(self._worst_group(v) for v in range(LAYOUT_CYCLE))
        if self.quota == 0:
            readers = self.num_readers
            raise ValueError(
                f"too few samples: the smallest of {readers} readers (world_size {world_size} x "
                f"{num_workers} loader workers) gets no full batch of micro_batch_size "
                f"{micro_batch_size} samples of one bucket in some epoch. The data needs at least "
                f"{readers * micro_batch_size} samples, in evenly sized shards and few buckets (it "
                f"has {int(self._counts.sum())} sample copies per epoch in {len(epoch_counts)} shards "
                f"and {self._counts.shape[1]} buckets); use fewer loader workers, a smaller "
                "micro_batch_size, fewer buckets (max_aspect) or more data")

    def layout(self, v: int) -> list[list[int]]:
        """Layout `v`: R groups of unit indices (into `units`), each in dealing order."""
        if v not in self._layouts:
            order = list(range(len(self.units)))
            epoch_rng("layout", self.seed, v).shuffle(order)
            heap = [(0, 0, g) for g in range(self.num_readers)]  # (samples, units, group)
            groups: list[list[int]] = [[] for _ in range(self.num_readers)]
            for u in order:
                total, count, g = heapq.heappop(heap)
                groups[g].append(u)
                heapq.heappush(heap, (total + self.units[u].num_samples, count + 1, g))
            self._layouts[v] = groups
        return self._layouts[v]

    def batches(self, units: Sequence[int]) -> int:
        """Single-bucket batches a reader of these unit indices can make."""
        sums = self._counts[list(units)].sum(axis=0)
        return int((sums // self.micro_batch_size).sum())

    def reader_units(self, epoch: int, reader: int) -> list[Unit]:
        """Reader `reader`'s units in `epoch`, in reading order."""
        groups = self.layout(epoch % LAYOUT_CYCLE)
        owner = list(range(self.num_readers))
        epoch_rng("readers", self.seed, epoch).shuffle(owner)
        units = [self.units[u] for u in groups[owner[reader]]]
        epoch_rng("order", self.seed, epoch, reader).shuffle(units)
        return units

    def _worst_group(self, v: int) -> int:
        return min(self.batches(group) for group in self.layout(v))
