"""data_shards' reader: ranks and loader workers get equal, disjoint batches; the order is keyed by
seed and epoch; a resumed stream equals the tail of an unskipped one."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from difftrain_dist.data_shards import ShardStream, build_shards, merge_indexes

from .shard_sources import DATA, RES, write_input

SIZES = (5, 2, 4)  # three uneven shards, fewer than the 4 readers of world_size=2 x 2 workers


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """One index over three separately built shards of 5, 2 and 4 photo crops; captions unique."""
    root = tmp_path_factory.mktemp("uneven")
    photos = [np.asarray(Image.open(DATA / n).convert("RGB")) for n in ("astronaut.png", "coffee.png")]
    number = 0
    for part, size in enumerate(SIZES):
        src = root / f"src{part}"
        for _ in range(size):
            photo = photos[number % 2]
            crop = photo[17 * number: 17 * number + 96, 23 * number: 23 * number + 96]
            write_input(src, f"crop{number:02d}.png", Image.fromarray(crop), caption=False)
            (src / f"crop{number:02d}.txt").write_text(f"sample {number:02d}")
            number += 1
        build_shards(src, root / f"part{part}", resolution=16, samples_per_shard=100)
    merge_indexes(root, [root / f"part{part}" for part in range(len(SIZES))])
    return root


def _take(stream, n: int) -> list[dict]:
    return list(islice(iter(stream), n))


def _loader(ds: ShardStream, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers)


@pytest.mark.parametrize("data", ["uneven", "built"])
def test_ranks_and_workers_yield_equal_batches_without_duplicates(request, data):
    index = request.getfixturevalue("uneven") if data == "uneven" else request.getfixturevalue("built")[1]
    size = 16 if data == "uneven" else RES
    epochs: dict[int, list[str]] = {}
    per_rank_counts = []
    for rank in range(2):
        ds = ShardStream(index, micro_batch_size=1, global_rank=rank, world_size=2, seed=7,
                         num_workers=2, shuffle_buffer=4)
        counts = [ds.batches_per_epoch] * 4
        per_rank_counts.append(counts)
        batches = _take(_loader(ds, 2), sum(counts))
        # Workers alternate; if one ran out first the epochs would interleave here.
        assert [(b["epoch"], b["batch_in_epoch"]) for b in batches] == [
            (e, i) for e in range(4) for i in range(counts[e])]
        for b in batches:
            assert b["pixel_values"].shape == (1, 3, size, size) and b["pixel_values"].dtype == torch.float32
            assert -1.0 <= float(b["pixel_values"].min()) and float(b["pixel_values"].max()) <= 1.0
            epochs.setdefault(b["epoch"], []).extend(b["captions"])
    assert per_rank_counts[0] == per_rank_counts[1]
    assert all(c % 2 == 0 and c > 0 for c in per_rank_counts[0])
    for epoch, captions in epochs.items():
        assert len(captions) == len(set(captions)) == 2 * per_rank_counts[0][epoch], epoch
        if data == "uneven":
            assert set(captions) <= {f"sample {i:02d}" for i in range(sum(SIZES))}


def test_same_seed_same_order_new_epoch_new_order(uneven):
    def captions(seed: int) -> list[list[str]]:
        ds = ShardStream(uneven / "index.json", micro_batch_size=1, global_rank=0, world_size=1,
                         seed=seed, num_workers=0)
        n = ds.batches_per_epoch
        assert n == sum(SIZES)
        batches = _take(ds, 2 * n)
        return [[c for b in batches[e * n:(e + 1) * n] for c in b["captions"]] for e in range(2)]

    first, again, other = captions(1), captions(1), captions(2)
    assert first == again
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1])
    assert first != other


def _same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g["epoch"], g["batch_in_epoch"], g["captions"], g["keys"]) == (
            w["epoch"], w["batch_in_epoch"], w["captions"], w["keys"])
        assert torch.equal(g["pixel_values"], w["pixel_values"])


@pytest.mark.parametrize("data, world_size, rank, batch", [("uneven", 1, 0, 2), ("built", 2, 1, 1)])
def test_resume_equals_tail_of_unskipped_stream(request, data, world_size, rank, batch):
    index = request.getfixturevalue("uneven") if data == "uneven" else request.getfixturevalue("built")[1]
    kw = dict(micro_batch_size=batch, global_rank=rank, world_size=world_size, seed=5,
              caption_dropout=0.3, shuffle_captions=True, keep_tokens=1, trigger_word="sks")
    full = _take(ShardStream(index, **kw), 16)
    per_epoch = ShardStream(index, **kw).batches_per_epoch
    assert 3 <= per_epoch <= 8  # so 16 batches cross at least one epoch boundary
    for start in (1, per_epoch - 1, per_epoch):  # mid-epoch, last batch, epoch end
        resumed = ShardStream(index, start_batch=start, **kw)
        _same_batches(_take(resumed, 16 - start), full[start:])
    epoch1 = ShardStream(index, start_epoch=1, **kw)
    _same_batches(_take(epoch1, 16 - per_epoch), full[per_epoch:])
    with pytest.raises(ValueError, match="start_batch"):
        ShardStream(index, start_batch=per_epoch + 1, **kw)


def test_resume_through_dataloader_workers(uneven):
    kw = dict(micro_batch_size=1, global_rank=0, world_size=1, seed=11, num_workers=2)
    full = _take(_loader(ShardStream(uneven, **kw), 2), 16)
    n = ShardStream(uneven, **kw).batches_per_epoch
    start = n - 3  # odd cursor: DataLoader worker 0 must replay worker 1's part; crosses epochs
    assert start % 2 == 1
    _same_batches(_take(_loader(ShardStream(uneven, start_batch=start, **kw), 2), 16 - start), full[start:])


def test_reader_argument_errors(uneven):
    with pytest.raises(ValueError, match="needs at least 16 samples"):
        ShardStream(uneven, micro_batch_size=8, global_rank=0, world_size=2, seed=0, num_workers=0)
    with pytest.raises(ValueError, match="global_rank"):
        ShardStream(uneven, micro_batch_size=1, global_rank=2, world_size=2, seed=0)
    in_process = ShardStream(uneven, micro_batch_size=1, global_rank=0, world_size=1, seed=0)
    loader_iter = iter(_loader(in_process, 2))
    with pytest.raises(ValueError, match="built with num_workers=0 but is read with 2 loader workers"):
        next(loader_iter)
    # The re-raised worker error keeps the iterator in a reference cycle; collected later, its
    # workers miss the shutdown message and each join waits 5 s. Stop them now instead.
    loader_iter._shutdown_workers()
    with pytest.raises(ValueError, match="not found"):
        ShardStream(uneven / "nowhere", micro_batch_size=1, global_rank=0, world_size=1, seed=0)
