"""Aspect-ratio buckets: assignment on real photographs, bucketed shards, and the bucketed reader
(single-bucket batches, equal batch counts per rank and loader worker, exact resume, repeats)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader

from difftrain_dist.data_shards import ShardIndex, ShardStream, build_shards, merge_indexes
from difftrain_dist.data_shards.buckets import candidate_buckets, choose_bucket
from difftrain_dist.data_shards.plan import LAYOUT_CYCLE, ReadPlan, slice_of

DATA = Path(skimage.data.data_dir)


def _photo(name: str) -> Image.Image:
    return Image.open(DATA / name).convert("RGB")


# Wide photos, the same photos turned to portrait, and square ones, at 512 px (bucket step 64).
EXPECTED_512 = {
    "chelsea.png": (576, 384),  # 451x300, 1.50:1
    "coffee.png": (576, 384),  # 600x400, exactly 3:2
    "hubble.png": (512, 448),  # 1000x872, 1.15:1
    "rocket.png": (576, 384),  # 640x427
    "chelsea_tall.png": (384, 576),  # chelsea rotated 90°
    "hubble_tall.png": (448, 512),
    "astronaut.png": (512, 512),
    "page.png": (640, 320),  # 384x191: smaller than its bucket
}
EXPECTED_256 = {"chelsea.png": (320, 192), "hubble.png": (256, 256), "chelsea_tall.png": (192, 320)}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    images = {
        "chelsea.png": _photo("chelsea.png"), "coffee.png": _photo("coffee.png"),
        "hubble.png": _photo("hubble_deep_field.jpg"), "rocket.png": _photo("rocket.jpg"),
        "astronaut.png": _photo("astronaut.png"), "page.png": _photo("page.png"),
    }
    images["chelsea_tall.png"] = images["chelsea.png"].transpose(Image.Transpose.ROTATE_90)
    images["hubble_tall.png"] = images["hubble.png"].transpose(Image.Transpose.ROTATE_270)
    for name, img in images.items():
        img.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"photo {Path(name).stem}", encoding="utf-8")
    return folder


def test_candidate_buckets_follow_the_rule():
    for res in (256, 512, 1024):
        buckets = candidate_buckets(res)
        assert (res, res) in buckets
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert 0.75 * res * res <= w * h <= res * res and max(w / h, h / w) <= 4
    assert candidate_buckets(512, 64, 1.0) == ((512, 512),)  # max_aspect 1: square crops only
    ratios = [w / h for w, h in candidate_buckets(1024)]
    assert len(ratios) == len(set(ratios))  # one bucket per aspect ratio: the largest
    assert candidate_buckets(32) == ((32, 32),)  # the step is capped at tiny resolutions
    assert (1024, 256) in candidate_buckets(512) and (1088, 192) not in candidate_buckets(512)  # 4:1 max
    # Ties in aspect ratio go to the larger area: 3:2 has 576x384 and 192x128 (too small here) ...
    assert choose_bucket(3, 2, [(192, 128), (576, 384), (512, 512)]) == (576, 384)


def test_real_photos_get_the_closest_aspect_bucket(photo_folder, tmp_path):
    index = build_shards(photo_folder, tmp_path / "out", resolution=[512, 256], samples_per_shard=5)
    metas: dict[tuple[str, int], dict] = {}
    per_shard: list[Counter] = []
    for shard in index.shards:
        counts: Counter = Counter()
        with tarfile.open(tmp_path / "out" / shard.name) as tar:
            names = sorted(m.name for m in tar.getmembers())
            for name in names:
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(name).read())
                    pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(name[:-5] + ".jpg").read())))
                    assert pixels.shape == (meta["bucket"][1], meta["bucket"][0], 3)  # [H, W, 3]
                    metas[(meta["source"], meta["resolution"])] = meta
                    counts[f"{meta['bucket'][0]}x{meta['bucket'][1]}"] += 1
        per_shard.append(counts)
    assert len(metas) == 2 * len(EXPECTED_512) == index.num_samples  # every image at both resolutions
    for name, bucket in EXPECTED_512.items():
        assert tuple(metas[(name, 512)]["bucket"]) == bucket, name
    for name, bucket in EXPECTED_256.items():
        assert tuple(metas[(name, 256)]["bucket"]) == bucket, name
    # index.json: per-shard bucket counts match the tars, the histogram is their sum.
    assert [dict(c) for c in per_shard] == [s.buckets for s in index.shards]
    assert index.buckets == dict(sum(per_shard, Counter()))
    assert index.buckets["576x384"] == 3 and index.resolutions == [512, 256]
    assert ShardIndex.load(tmp_path / "out") == index


def test_small_photos_are_skipped_per_resolution(photo_folder, tmp_path):
    index = build_shards(photo_folder, tmp_path / "skip", resolution=[512, 256], small_images="skip")
    reasons = [(s.source, s.kind, s.reason.split(" (")[0]) for s in index.skipped]
    assert reasons == [  # chelsea is 451x300: fine at 256 px, below its 576x384 bucket at 512 px
        ("chelsea.png", "small_image", "smaller than its bucket at resolution 512: 451x300 px < 576x384"),
        ("chelsea_tall.png", "small_image", "smaller than its bucket at resolution 512: 300x451 px < 384x576"),
        ("page.png", "small_image", "smaller than its bucket at resolution 512: 384x191 px < 640x320"),
        ("page.png", "small_image", "smaller than its bucket at resolution 256: 384x191 px < 320x192"),
    ]
    assert index.num_samples == 2 * len(EXPECTED_512) - len(reasons)


# ------------------------------------------------------------------------------ bucketed reader

def _unit_batches(units, micro_batch_size: int) -> int:
    totals = np.sum([u.counts for u in units], axis=0)
    return int((totals // micro_batch_size).sum())


@pytest.mark.parametrize("counts", [
    [[5], [2], [4]], [[7]], [[3], [9], [1], [4], [4], [6], [2]], [[10]] * 9 + [[1]],
    [[3, 2, 0], [0, 5, 1], [4, 0, 4]],  # three buckets, uneven
    [[6, 6], [1, 0]],  # fewer shards than readers, two buckets
])
def test_plan_units_partition_the_data_and_quota_holds_in_every_epoch(counts):
    for world_size, workers, batch in ((1, 1, 1), (2, 2, 1), (3, 2, 1), (4, 1, 1), (2, 1, 2)):
        readers = world_size * workers
        try:
            plan = ReadPlan(counts, seed=3, world_size=world_size, num_workers=workers, micro_batch_size=batch)
        except ValueError as err:
            assert f"needs at least {readers * batch} samples" in str(err)
            continue
        everything = {(s, b, o) for s, row in enumerate(counts) for b, n in enumerate(row) for o in range(n)}
        minimums = []
        for epoch in range(2 * LAYOUT_CYCLE + 3):
            per_reader = [plan.reader_units(epoch, r) for r in range(readers)]
            seen = [(u.shard, b, o) for units in per_reader for u in units
                    for b, n in enumerate(counts[u.shard]) for o in range(n)
                    if slice_of(u.shard, b, o, u.num_slices) == u.slice_index]
            assert len(seen) == len(set(seen)) and set(seen) == everything
            for units in per_reader:
                for u in units:
                    assert u.counts == tuple(sum(slice_of(u.shard, b, o, u.num_slices) == u.slice_index
                                                 for o in range(n)) for b, n in enumerate(counts[u.shard]))
            minimums.append(min(_unit_batches(units, batch) for units in per_reader))
        assert plan.quota == min(minimums) > 0, (counts, world_size, workers)
        assert minimums[:LAYOUT_CYCLE] == minimums[LAYOUT_CYCLE:2 * LAYOUT_CYCLE]  # layouts cycle



PART_SIZES = {"a": 13, "b": 4, "c": 7}  # uneven parts; "c" has num_repeats=2
SHAPES = ((96, 96), (192, 96), (96, 192))  # square, wide, tall crops → buckets 128x128, 192x64, 64x192


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> Path:
    """Three separately built parts (one shard each) merged into one index; captions unique."""
    root = tmp_path_factory.mktemp("bucketed")
    photos = [np.asarray(_photo(n)) for n in ("astronaut.png", "coffee.png", "chelsea.png")]
    number = 0
    for part, size in PART_SIZES.items():
        src = root / f"src-{part}"
        src.mkdir()
        for _ in range(size):
            w, h = SHAPES[(number * 7) % 5 % 3]
            crop = photos[number % 3][3 * number: 3 * number + h, 5 * number: 5 * number + w]
            Image.fromarray(crop).save(src / f"crop{number:02d}.png")
            (src / f"crop{number:02d}.txt").write_text(f"sample {number:02d}, tag a, tag b, tag c")
            number += 1
        build_shards(src, root / part, resolution=128, samples_per_shard=100,
                     num_repeats=2 if part == "c" else 1)
    merge_indexes(root, [root / p for p in PART_SIZES])
    return root


def _loader(ds: ShardStream, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers)


def test_merged_index_counts_repeats(bucketed):
    index = ShardIndex.load(bucketed)
    assert [(s.name, s.num_samples, s.repeats) for s in index.shards] == [
        ("a/shard-000000.tar", 13, 1), ("b/shard-000000.tar", 4, 1), ("c/shard-000000.tar", 7, 2)]
    assert index.num_samples == 24 and index.samples_per_epoch == 31
    assert set(index.buckets) == {"128x128", "192x64", "64x192"}
    assert sum(index.buckets.values()) == 24
    assert index.build == {"merged": ["a", "b", "c"]}


def test_batches_are_single_bucket_and_balanced_across_ranks_and_workers(bucketed):
    """2 ranks x 2 loader workers = 4 readers over 3 uneven shards of 3 buckets."""
    epochs = 3
    per_rank = []
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        ds = ShardStream(bucketed, micro_batch_size=2, global_rank=rank, world_size=2, seed=1,
                         num_workers=2, shuffle_buffer=8)
        n = ds.batches_per_epoch
        per_rank.append(n)
        batches = list(islice(iter(_loader(ds, 2)), epochs * n))
        assert [(b["epoch"], b["batch_in_epoch"]) for b in batches] == [
            (e, i) for e in range(epochs) for i in range(n)]  # no worker ran dry, none ran ahead
        for b in batches:
            w, h = b["bucket"]
            assert b["pixel_values"].shape == (2, 3, h, w) and b["pixel_values"].dtype == torch.float32
            assert -1.0 <= float(b["pixel_values"].min()) and float(b["pixel_values"].max()) <= 1.0
            seen.setdefault(b["epoch"], []).extend(b["keys"])
    assert per_rank[0] == per_rank[1] > 0 and per_rank[0] % 2 == 0
    for keys in seen.values():
        assert len(keys) == len(set(keys)) == 2 * per_rank[0] * 2  # no sample copy twice in an epoch
    copies = [k for keys in seen.values() for k in keys if k.endswith("#1")]
    assert copies and all(k.startswith("c/") for k in copies)  # only part "c" repeats


def test_every_batch_holds_one_bucket(bucketed):
    """The bucket a batch claims is the bucket of each of its samples (KEY.json)."""
    buckets = {}
    for part in PART_SIZES:
        with tarfile.open(bucketed / part / "shard-000000.tar") as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    buckets[f"{part}/shard-000000.tar/{m.name[:-5]}"] = json.loads(tar.extractfile(m).read())["bucket"]
    ds = ShardStream(bucketed, micro_batch_size=3, global_rank=0, world_size=1, seed=4)
    for b in islice(iter(ds), 3 * ds.batches_per_epoch):
        assert {tuple(buckets[k.split("#")[0]]) for k in b["keys"]} == {tuple(b["bucket"])}


def test_resume_with_buckets_equals_tail(bucketed):
    kw = dict(micro_batch_size=2, global_rank=1, world_size=2, seed=9, num_workers=2,
              caption_dropout=0.2, shuffle_captions=True, keep_tokens=1, trigger_word="sks")
    n = ShardStream(bucketed, **kw).batches_per_epoch
    total = 2 * n + 2
    full = list(islice(iter(_loader(ShardStream(bucketed, **kw), 2)), total))
    for start in (1, n - 1, n + 1):  # odd cursors: loader workers swap roles; one in epoch 1
        epoch, batch = divmod(start, n)
        resumed = ShardStream(bucketed, start_epoch=epoch, start_batch=batch, **kw)
        got = list(islice(iter(_loader(resumed, 2)), total - start))
        assert len(got) == len(full[start:])
        for g, w in zip(got, full[start:], strict=True):
            assert (g["epoch"], g["batch_in_epoch"], g["keys"], g["captions"], g["bucket"]) == (
                w["epoch"], w["batch_in_epoch"], w["keys"], w["captions"], w["bucket"])
            assert torch.equal(g["pixel_values"], w["pixel_values"])


def test_too_many_readers_is_a_clear_error(bucketed):
    with pytest.raises(ValueError, match="needs at least 128 samples"):
        ShardStream(bucketed, micro_batch_size=8, global_rank=0, world_size=4, seed=0, num_workers=4)
