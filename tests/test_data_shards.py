"""data_shards: folder → shards (real skimage photographs plus broken/odd files), the index, and the
checks made as shards are read."""

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

from difftrain_dist.data_shards import ShardIndex, ShardStream, build_shards
from difftrain_dist.data_shards.files import sha256_file
from difftrain_dist.data_shards.index import Precomputed, SidecarInfo
from difftrain_dist.data_shards.precomputed import sidecar_name, tar_samples, write_sidecar

from .shard_sources import KEPT, RES, SKIPPED, TRIGGER, caption_for, read_tar, write_input


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
            assert s["caption"] == caption_for(meta["source"])
        assert meta["resolution"] == RES
        assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert meta["bucket"] == [RES, RES]
        assert s["pixels"].shape == (RES, RES, 3) and s["pixels"].dtype == np.uint8
    meta = {s["meta"]["source"]: s["meta"] for s in samples}
    assert (meta["chelsea.png"]["width"], meta["chelsea.png"]["height"]) == (451, 300)
    hubble = meta["nested/deeper/hubble.jpg"]
    assert (hubble["width"], hubble["height"]) == (1000, 872)


def test_folder_without_usable_images_gives_an_empty_index(tmp_path):
    write_input(tmp_path / "src", "only.png", caption=False).write_bytes(b"")
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
    rows = read_tar(tmp_path / "out" / index.shards[0].name)
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
        sidecars.append(SidecarInfo(name=path.name, sha256=sha256_file(path)))
    index.precomputed = Precomputed(model="tiny", arch="sd15", conditioning=("encoder_hidden_states",),
                                    sidecars=tuple(sidecars))
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
