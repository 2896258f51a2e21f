"""data_shards: folder → shards (real skimage photographs plus broken/odd files) and the reader."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader

from difftrain_dist.data_shards import ShardIndex, ShardStream, build_shards
from difftrain_dist.data_shards.index import sha256_file
from difftrain_dist.data_shards.precomputed import Precomputed, SidecarInfo, sidecar_name, tar_samples, write_sidecar

DATA = Path(skimage.data.data_dir)
RES = 32

# (file in the source folder, skimage file it comes from); every one has a caption.
PHOTOS = {
    "astronaut.png": "astronaut.png",  # RGB
    "camera.png": "camera.png",  # L
    "chelsea.png": "chelsea.png",  # RGB, 451x300
    "coffee.png": "coffee.png",  # RGB, 600x400
    "horse.png": "horse.png",  # RGBA
    "logo.png": "logo.png",  # RGBA (fully opaque)
    "nested/ROCKET.JPG": "rocket.jpg",  # RGB JPEG, upper-case extension
    "nested/deeper/hubble.jpg": "hubble_deep_field.jpg",  # RGB JPEG 1000x872
}
KEPT = [  # walk order: a folder's files sorted, then its sub-folders
    "astronaut.png", "camera.png", "chelsea.png", "cmyk.jpg", "coffee.png", "dup.jpg", "exif_rotated.jpg",
    "half_transparent.png", "horse.png", "logo.png", "palette.png", "palette_transparent.png",
    "sixteen_bit.png", "tiny.png", "trigger.png", "nested/ROCKET.JPG", "nested/deeper/hubble.jpg",
]
SKIPPED = {  # source -> (kind, words the reason must contain)
    "bad_caption.png": ("caption_encoding", "not UTF-8"),
    "dup.png": ("duplicate_stem", "duplicate stem: dup.png shares the stem 'dup' (caption dup.txt) with dup.jpg"),
    "empty.jpg": ("empty", "empty file"),
    "garbage.jpg": ("decode", "cannot decode image: UnidentifiedImageError: cannot identify image file"),
    "no_caption.png": ("no_caption", "no caption file no_caption.txt"),
    "notes.md": ("not_image", "not an image"),
    "truncated.jpg": ("decode", "truncated"),
}
TRIGGER = "ohwx"


def _caption(name: str) -> str:
    return f"a photo: {Path(name).stem} ✓"


def _write(folder: Path, name: str, img: Image.Image | None = None, caption: bool = True,
           **save_kw) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is not None:
        img.save(path, **save_kw)
    if caption:
        path.with_suffix(".txt").write_text(_caption(name) + "\n", encoding="utf-8")
    return path


def _make_source(folder: Path) -> None:
    for name, original in PHOTOS.items():
        _write(folder, name).write_bytes((DATA / original).read_bytes())
    astronaut, chelsea = Image.open(DATA / "astronaut.png"), Image.open(DATA / "chelsea.png")
    camera = np.asarray(Image.open(DATA / "camera.png"))
    _write(folder, "cmyk.jpg", astronaut.convert("CMYK"), format="JPEG", quality=95)
    _write(folder, "palette.png", chelsea.quantize(32))
    half = Image.open(DATA / "coffee.png").convert("RGBA")
    alpha = np.full(half.size[::-1], 255, np.uint8)
    alpha[:, : half.size[0] // 2] = 0  # left half fully transparent
    half.putalpha(Image.fromarray(alpha))
    _write(folder, "half_transparent.png", half)
    _write(folder, "palette_transparent.png", half.quantize(64))
    _write(folder, "sixteen_bit.png", Image.fromarray(camera.astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    _write(folder, "exif_rotated.jpg", chelsea.transpose(Image.Transpose.ROTATE_90),
           format="JPEG", quality=95, exif=exif.tobytes())
    _write(folder, "empty.jpg").write_bytes(b"")
    _write(folder, "garbage.jpg").write_bytes(b"not an image, whatever its name says")
    rocket = (DATA / "rocket.jpg").read_bytes()
    _write(folder, "truncated.jpg").write_bytes(rocket[: len(rocket) // 2])
    _write(folder, "no_caption.png", caption=False).write_bytes((DATA / "coins.png").read_bytes())
    _write(folder, "bad_caption.png", caption=False).write_bytes((DATA / "moon.png").read_bytes())
    (folder / "bad_caption.txt").write_bytes("café".encode("latin-1"))
    (folder / "notes.md").write_text("not an image")
    # a.jpg and a.png would share a.txt: the first by name is kept, the other reported.
    _write(folder, "dup.jpg", astronaut.convert("RGB"), format="JPEG", quality=90)
    _write(folder, "dup.png", chelsea, caption=False)
    _write(folder, "tiny.png", chelsea.resize((20, 13)))  # smaller than every bucket: upscaled by default
    _write(folder, "trigger.png", chelsea.rotate(180), caption=False)
    (folder / "trigger.txt").write_text("[trigger], a cat upside down, [name] again", encoding="utf-8")
    (folder / ".hidden.png").write_bytes(b"ignored")


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, ShardIndex]:
    root = tmp_path_factory.mktemp("build")
    _make_source(root / "src")
    index = build_shards(root / "src", root / "out", resolution=RES, samples_per_shard=5, trigger_word=TRIGGER)
    return root / "src", root / "out", index


@pytest.fixture(scope="module")
def samples(built) -> list[dict]:
    """Every sample of the build, in shard order: {"key", "meta", "caption", "pixels"}."""
    _, out, index = built
    rows = []
    for shard in index.shards:
        for key, members in sorted(_read_tar(out / shard.name).items()):
            assert sorted(members) == ["jpg", "json", "txt"]
            rows.append({"key": key, "meta": json.loads(members["json"]),
                         "caption": members["txt"].decode("utf-8"),
                         "pixels": np.asarray(Image.open(io.BytesIO(members["jpg"])))})
    return rows


def test_build_keeps_good_inputs_and_reports_bad_ones(built, samples):
    _, out, index = built
    assert [s["meta"]["source"] for s in samples] == KEPT
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(len(KEPT))]
    assert {s.source: s.reason for s in index.skipped}.keys() == SKIPPED.keys()
    for skip in index.skipped:
        kind, words = SKIPPED[skip.source]
        assert skip.kind == kind and words in skip.reason, skip
    assert index.skipped[[s.source for s in index.skipped].index("garbage.jpg")].reason == SKIPPED["garbage.jpg"][1]
    assert index.num_samples == len(KEPT) and index.buckets == {f"{RES}x{RES}": len(KEPT)}
    assert [(s.name, s.num_samples) for s in index.shards] == [
        ("shard-000000.tar", 5), ("shard-000001.tar", 5), ("shard-000002.tar", 5), ("shard-000003.tar", 2)]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]


def test_index_json_matches_files(built):
    src, out, index = built
    doc = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert doc["version"] == 2 and doc["resolutions"] == [RES] and doc["num_samples"] == len(KEPT)
    assert [s["buckets"] for s in doc["shards"]] == [{f"{RES}x{RES}": n} for n in (5, 5, 5, 2)]
    assert doc["build"]["trigger_word"] == TRIGGER and doc["build"]["small_images"] == "upscale"
    assert {s["repeats"] for s in doc["shards"]} == {1}
    for shard in doc["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
        with tarfile.open(out / shard["name"]) as tar:  # plain ustar members: no per-member pax header
            assert all(m.pax_headers == {} and m.mtime == 0 for m in tar.getmembers())
    assert doc == index.to_dict()
    assert ShardIndex.load(out) == index == ShardIndex.load(f"file://{out}/index.json")
    index.verify_checksums()


def test_round_trip_metadata_captions_and_pixels(built, samples):
    src, _, _ = built
    for s in samples:
        meta, source = s["meta"], src / s["meta"]["source"]
        if meta["source"] == "trigger.png":  # placeholders filled with the trigger word at build time
            assert s["caption"] == "ohwx, a cat upside down, ohwx again"
        else:
            assert s["caption"] == _caption(meta["source"])
        assert meta["resolution"] == RES
        assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert meta["bucket"] == [RES, RES]
        assert s["pixels"].shape == (RES, RES, 3) and s["pixels"].dtype == np.uint8
    meta = {s["meta"]["source"]: s["meta"] for s in samples}
    assert (meta["chelsea.png"]["width"], meta["chelsea.png"]["height"]) == (451, 300)
    hubble = meta["nested/deeper/hubble.jpg"]
    assert (hubble["width"], hubble["height"]) == (1000, 872)


def test_folder_without_usable_images_gives_an_empty_index(tmp_path):
    _write(tmp_path / "src", "only.png", caption=False).write_bytes(b"")
    index = build_shards(tmp_path / "src", tmp_path / "out", resolution=RES)
    assert (index.num_samples, index.shards, index.buckets) == (0, [], {})
    assert index.skipped[0]["source"] == "only.png" and "no caption" in index.skipped[0]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json"]
    with pytest.raises(ValueError, match="holds no samples"):
        ShardStream(tmp_path / "out", micro_batch_size=1, global_rank=0, world_size=1, seed=0)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_odd_modes_are_converted_correctly(samples):
    px = {s["meta"]["source"]: s["pixels"] for s in samples}
    meta = {s["meta"]["source"]: s["meta"] for s in samples}
    # EXIF orientation applied: size as displayed, pixels match the unrotated original.
    assert (meta["exif_rotated.jpg"]["width"], meta["exif_rotated.jpg"]["height"]) == (451, 300)
    assert _diff(px["exif_rotated.jpg"], px["chelsea.png"]) < 4
    assert _diff(np.rot90(px["exif_rotated.jpg"]), px["chelsea.png"]) > 20
    # 16-bit grey is scaled, not clipped to white; grey becomes 3 equal channels.
    assert _diff(px["sixteen_bit.png"], px["camera.png"]) < 2
    assert _diff(px["camera.png"][..., 0], px["camera.png"][..., 2]) < 2
    # CMYK JPEG comes back as the RGB it was made from.
    assert _diff(px["cmyk.jpg"], px["astronaut.png"]) < 4
    # Transparent pixels are composited on white (RGBA and palette + tRNS); opaque half untouched.
    for name in ("half_transparent.png", "palette_transparent.png"):
        assert px[name][:, : RES // 2 - 2].min() >= 245, name
        assert px[name][:, RES // 2 + 2:].mean() < 200, name
    assert _diff(px["palette.png"], px["chelsea.png"]) < 8


def test_default_caption_keeps_uncaptioned_images(built, tmp_path):
    src, _, _ = built
    index = build_shards(src, tmp_path / "out", resolution=16, default_caption="a photo")
    assert index.num_samples == len(KEPT) + 1
    assert "no_caption.png" not in {s.source for s in index.skipped}
    rows = _read_tar(tmp_path / "out" / index.shards[0].name)
    captions = {json.loads(m["json"])["source"]: m["txt"].decode() for m in rows.values()}
    assert captions["no_caption.png"] == "a photo"


def test_upscaled_images_are_counted_and_listed(built):
    _, out, index = built  # small_images: upscale (the default)
    reason = "smaller than its bucket at resolution 32: 20x13 px < 32x32, upscaled 2.46x (small_images: upscale)"
    assert [(u.source, u.resolution, u.reason) for u in index.upscaled] == [("tiny.png", RES, reason)]
    doc = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert doc["upscaled"] == [{"source": "tiny.png", "resolution": RES, "reason": reason}]
    assert ShardIndex.load(out).upscaled == index.upscaled


def test_same_inputs_give_byte_identical_index(built, tmp_path):
    src, out, _ = built
    build_shards(src, tmp_path / "again", resolution=RES, samples_per_shard=5, trigger_word=TRIGGER)
    text = (out / "index.json").read_text(encoding="utf-8")
    assert not re.search(r"0x[0-9a-fA-F]{4,}", text), "a memory address in index.json"
    assert (tmp_path / "again" / "index.json").read_bytes() == text.encode("utf-8")


def test_small_image_policy_and_missing_caption_error(built, tmp_path):
    src, _, _ = built
    index = build_shards(src, tmp_path / "skip", resolution=RES, small_images="skip", default_caption="x")
    small = [s for s in index.skipped if s.kind == "small_image"]
    assert [s.source for s in small] == ["tiny.png"]
    assert "at resolution 32: 20x13 px < 32x32 (small_images: skip)" in small[0].reason
    assert index.upscaled == []
    assert index.num_samples == len(KEPT)  # tiny.png out, no_caption.png in (default caption)
    with pytest.raises(ValueError, match=r"missing_caption is 'error' and 1 input\(s\) have no caption: "
                                         r"no_caption.png\. Add caption files"):
        build_shards(src, tmp_path / "error", resolution=RES, missing_caption="error")
    assert not (tmp_path / "error").exists()  # folders are checked before anything is written
    with pytest.raises(ValueError, match="missing_caption: 'default' with default_caption=None"):
        build_shards(src, tmp_path / "o", resolution=RES, missing_caption="default")
    with pytest.raises(ValueError, match="small_images: expected one of"):
        build_shards(src, tmp_path / "o", resolution=RES, small_images="crop")


def test_build_refuses_existing_shards_and_bad_arguments(built, tmp_path):
    src, out, _ = built
    with pytest.raises(ValueError, match="already holds index.json"):
        build_shards(src, out, resolution=RES)
    with pytest.raises(ValueError, match="src .*not a folder"):
        build_shards(tmp_path / "missing", tmp_path / "o", resolution=RES)
    with pytest.raises(ValueError, match="resolution"):
        build_shards(src, tmp_path / "o", resolution=0)
    with pytest.raises(ValueError, match="caption_ext"):
        build_shards(src, tmp_path / "o", resolution=RES, caption_ext="txt")


def test_index_load_errors_name_the_file(built, tmp_path):
    _, out, _ = built
    with pytest.raises(ValueError, match="index.json.*not found"):
        ShardIndex.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "shard-000001.tar").write_bytes(b"changed")
    with pytest.raises(ValueError, match="shard-000001.tar: shard is truncated: 7 of the"):
        ShardIndex.load(copy)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(ValueError, match=r"shards\[1\] file .*shard-000001.tar does not exist"):
        ShardIndex.load(copy)
    doc = json.loads((out / "index.json").read_text())
    doc["shards"][0]["buckets"] = {f"{RES}x{RES}": 4}
    (copy / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shards\[0\]: field 'buckets' adds up to 4 samples, but 'num_samples' is 5"):
        ShardIndex.load(copy)
    doc = json.loads((out / "index.json").read_text())
    del doc["shards"][0]["sha256"]
    (copy / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shards\[0\]: missing field 'sha256'"):
        ShardIndex.load(copy)


def _copy_of(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def _member_offset(tar_path: Path, member: int = 0) -> tuple[int, int]:
    """(offset of the data of the tar's `member`-th member, its size), bytes."""
    with tarfile.open(tar_path) as tar:
        info = tar.getmembers()[member]
        return info.offset_data, info.size


def _stream_keys(folder: Path, limit: int = 200) -> list[str]:
    """Keys of the batches a one-rank stream yields (at most `limit` batches), in order."""
    stream = ShardStream(folder, micro_batch_size=1, global_rank=0, world_size=1, seed=0, shuffle_buffer=0)
    return [key for batch in islice(iter(stream), limit) for key in batch["keys"]]


def test_flipped_byte_is_caught_before_any_sample_of_its_shard(built, tmp_path):
    _, out, _ = built
    copy = _copy_of(out, tmp_path)
    shard = copy / "shard-000002.tar"
    offset, size = _member_offset(shard)  # inside the first JPEG: the tar still reads, the image decodes
    data = bytearray(shard.read_bytes())
    data[offset + size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    keys: list[str] = []
    stream = ShardStream(copy, micro_batch_size=1, global_rank=0, world_size=1, seed=0, shuffle_buffer=0)
    corrupt = r"shard-000002\.tar: shard is corrupt: sha256 [0-9a-f]{64} does not match index\.json \([0-9a-f]{64}\)"
    with pytest.raises(ValueError, match=corrupt):
        for batch in islice(iter(stream), 200):
            keys += batch["keys"]
    assert not any(k.startswith("shard-000002.tar/") for k in keys), keys
    with pytest.raises(ValueError, match=corrupt):
        ShardIndex.load(copy).verify_checksums()


def test_truncated_shard_is_named_with_its_size(built, tmp_path):
    _, out, _ = built
    copy = _copy_of(out, tmp_path)
    shard = copy / "shard-000001.tar"
    whole = shard.read_bytes()
    offset, size = _member_offset(shard, 3)
    cut = offset + size // 2  # in the middle of a member
    shard.write_bytes(whole[:cut])
    with pytest.raises(ValueError, match=rf"shard-000001\.tar: shard is truncated: {cut} of the {len(whole)} "
                                         r"bytes index\.json lists"):
        ShardIndex.load(copy)  # a stat per shard: before any training starts
    # An index.json without sizes (an older build): the checksum catches it as the shard is read.
    doc = json.loads((copy / "index.json").read_text())
    for entry in doc["shards"]:
        del entry["num_bytes"]
    (copy / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shard-000001\.tar: shard is corrupt or truncated: sha256 "):
        _stream_keys(copy)
    # Read without an index, the tar itself says it is cut short (not "lacks an image or a caption").
    with pytest.raises(ValueError, match=r"shard-000001\.tar: truncated or corrupt tar \(ReadError: "):
        list(tar_samples(shard))


def test_tar_cut_between_members_is_truncated(tmp_path):
    # Cut where a member's header starts on a 10240-byte tar record, tarfile ends without an error,
    # as if the tar were complete; only the missing end-of-archive block tells.
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in (("a.jpg", 8704), ("a.txt", 10), ("b.jpg", 100), ("b.txt", 10)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    assert [s["__key__"] for s in tar_samples(path)] == ["a", "b"]
    assert _member_offset(path, 2)[0] == 10240 + 512  # b.jpg's header is at 10240
    path.write_bytes(path.read_bytes()[:10240])
    with pytest.raises(ValueError, match=r"cut\.tar: truncated tar: it ends after member a\.txt with no "
                                         r"end-of-archive block"):
        list(tar_samples(path))


def test_corrupt_precomputed_sidecar_is_named(built, tmp_path):
    _, out, _ = built
    copy = _copy_of(out, tmp_path)
    index = ShardIndex.load(copy)
    sidecars = []
    for i, shard in enumerate(index.shards):
        path = copy / sidecar_name(shard.name)
        write_sidecar(path, [(s["__key__"], np.zeros((8, 4, 4)), {"encoder_hidden_states": np.ones((7, 8))})
                             for s in tar_samples(index.shard_path(i))])
        sidecars.append(SidecarInfo(path.name, sha256_file(path)))
    index.precomputed = Precomputed("tiny", "sd15", ("encoder_hidden_states",), tuple(sidecars))
    index.save(copy)
    batch = next(iter(ShardStream(copy, micro_batch_size=1, global_rank=0, world_size=1, seed=0)))
    assert batch["latent_parameters"].shape == (1, 8, 4, 4)  # the sidecars are read
    sidecar = copy / sidecars[0].name
    offset, size = _member_offset(sidecar)
    data = bytearray(sidecar.read_bytes())
    data[offset + size - 1] ^= 0x40  # one float of the first latent
    sidecar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000000\.precomputed\.tar: sidecar is corrupt or truncated: sha256 .*"
                                         r"run `shards precompute` again"):
        _stream_keys(copy)


# --------------------------------------------------------------------------------------- reader

SIZES = (5, 2, 4)  # three uneven shards, fewer than the 4 readers of world_size=2 x 2 workers


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """One index over three separately built shards of 5, 2 and 4 photo crops; captions unique."""
    root = tmp_path_factory.mktemp("uneven")
    photos = [np.asarray(Image.open(DATA / n).convert("RGB")) for n in ("astronaut.png", "coffee.png")]
    shards, number = [], 0
    for part, size in enumerate(SIZES):
        src = root / f"src{part}"
        for _ in range(size):
            photo = photos[number % 2]
            crop = photo[17 * number: 17 * number + 96, 23 * number: 23 * number + 96]
            _write(src, f"crop{number:02d}.png", Image.fromarray(crop), caption=False)
            (src / f"crop{number:02d}.txt").write_text(f"sample {number:02d}")
            number += 1
        index = build_shards(src, root / f"part{part}", resolution=16, samples_per_shard=100)
        shards += [{**vars(s), "name": f"part{part}/{s.name}"} for s in index.shards]
    merged = {"version": 1, "resolution": 16, "num_samples": sum(SIZES), "shards": shards,
              "buckets": {"16x16": sum(SIZES)}, "skipped": []}
    (root / "index.json").write_text(json.dumps(merged))
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
