"""build_shards from existing WebDataset / img2dataset tars: local, file://, http:// (a local server),
braces, pipe: (refused unless allowed), broken tars and members; and the `shards` CLI."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import skimage.data
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from difftrain_dist.data_shards import ShardIndex, build_shards
from difftrain_dist.launcher.app import app

DATA = Path(skimage.data.data_dir)
RES = 64


def _encoded(name: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(DATA / name).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


# img2dataset layout: KEY.jpg + KEY.txt (caption) + KEY.json (metadata, caption again).
TAR_SAMPLES = [
    {"__key__": "000000000", "jpg": (DATA / "rocket.jpg").read_bytes(), "txt": "a rocket",
     "json": {"caption": "a rocket", "url": "https://example.com/rocket.jpg", "status": "success"}},
    {"__key__": "000000001", "webp": _encoded("coffee.png", "WEBP"),
     "json": {"caption": "coffee, from the json", "url": "https://example.com/coffee.webp"}},
    {"__key__": "000000002", "png": (DATA / "astronaut.png").read_bytes(), "json": {"status": "success"}},
    {"__key__": "000000003", "jpg": b"not a jpeg at all", "txt": "broken"},
    {"__key__": "000000004", "txt": "a caption without an image", "json": {"caption": "x"}},
    {"__key__": "000000005", "png": (DATA / "moon.png").read_bytes(), "txt": "[trigger] on the moon"},
]
KEPT = {"000000000": "a rocket", "000000001": "coffee, from the json", "000000005": "ohwx on the moon"}
SKIPPED = {"000000002": "no_caption", "000000003": "decode", "000000004": "no_image"}


def _write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tars")
    _write_tar(root / "web" / "part-000.tar", TAR_SAMPLES)
    _write_tar(root / "web" / "part-001.tar", [
        {"__key__": "a", "jpg": (DATA / "chelsea.png").read_bytes(), "txt": "a cat"}])  # png bytes as .jpg
    return root


def _kept(out: Path, index: ShardIndex) -> dict[str, tuple[str, dict]]:
    """source -> (caption, KEY.json) of every written sample."""
    rows = {}
    for shard in index.shards:
        with tarfile.open(out / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                rows[meta["source"]] = (members[name[:-5] + ".txt"].decode(), meta)
    return rows


def _check_part0(index: ShardIndex, out: Path, prefix: str) -> None:
    rows = _kept(out, index)
    assert {k: v[0] for k, v in rows.items() if k.startswith(prefix + "#")} == {
        f"{prefix}#{k}": caption for k, caption in KEPT.items()}
    skipped = {s.source: s.kind for s in index.skipped}
    assert {k: v for k, v in skipped.items() if k.startswith(prefix + "#")} == {
        f"{prefix}#{k}": kind for k, kind in SKIPPED.items()}
    rocket = rows[f"{prefix}#000000000"][1]
    assert rocket["url"] == "https://example.com/rocket.jpg"
    assert rocket["sha256"] == hashlib.sha256((DATA / "rocket.jpg").read_bytes()).hexdigest()
    assert (rocket["width"], rocket["height"]) == (640, 427)


def test_folder_of_tars_is_resharded_through_the_image_pipeline(tars, tmp_path):
    index = build_shards(tars / "web", tmp_path / "out", resolution=RES, trigger_word="ohwx")
    _check_part0(index, tmp_path / "out", "part-000.tar")
    assert index.num_samples == len(KEPT) + 1  # + the cat of part-001.tar
    reasons = {s.source: s.reason for s in index.skipped}
    assert "no caption (.txt member or 'caption' in .json)" in reasons["part-000.tar#000000002"]
    assert "cannot decode image" in reasons["part-000.tar#000000003"]
    assert "no image member (has ['json', 'txt'])" in reasons["part-000.tar#000000004"]


def test_tar_paths_braces_and_file_urls(tars, tmp_path):
    web = tars / "web"
    index = build_shards([str(web / "part-{000..001}.tar")], tmp_path / "braces", resolution=RES,
                         trigger_word="ohwx")
    assert index.num_samples == len(KEPT) + 1
    _check_part0(index, tmp_path / "braces", str(web / "part-000.tar"))
    url = (web / "part-000.tar").as_uri()
    index = build_shards(url, tmp_path / "file-url", resolution=RES, trigger_word="ohwx")
    _check_part0(index, tmp_path / "file-url", url)


@pytest.fixture()
def http_root(tars):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tars))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_tars_from_a_local_server(http_root, tmp_path):
    url = f"{http_root}/web/part-000.tar"
    missing = f"{http_root}/web/part-404.tar"
    index = build_shards([url, missing], tmp_path / "out", resolution=RES, trigger_word="ohwx")
    _check_part0(index, tmp_path / "out", url)
    gone = [s for s in index.skipped if s.source == missing]
    assert len(gone) == 1 and gone[0].kind == "tar" and "404" in gone[0].reason


def test_shell_urls_are_refused_unless_allowed(tars, tmp_path):
    tar = tars / "web" / "part-000.tar"
    with pytest.raises(ValueError, match=r"'pipe:' URLs run a shell command; pass allow_shell_urls=True"):
        build_shards(f"pipe:cat {tar}", tmp_path / "refused", resolution=RES)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="unsupported URL scheme s3://"):
        build_shards("s3://bucket/shard.tar", tmp_path / "s3", resolution=RES)
    index = build_shards(f"pipe:cat {tar}", tmp_path / "allowed", resolution=RES, trigger_word="ohwx",
                         allow_shell_urls=True)
    _check_part0(index, tmp_path / "allowed", f"pipe:cat {tar}")


def test_truncated_tar_keeps_what_it_could_read(tars, tmp_path):
    whole = (tars / "web" / "part-000.tar").read_bytes()
    cut = tmp_path / "src" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    index = build_shards(cut.parent, tmp_path / "out", resolution=RES, default_caption="a photo")
    broken = [s for s in index.skipped if s.kind == "tar"]
    assert [s.source for s in broken] == ["cut.tar"]
    assert broken[0].reason.startswith("cannot read tar after ")
    assert index.num_samples >= 1


def test_missing_caption_error_lists_tar_members_and_writes_nothing(tars, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 input\(s\) have no caption: part-000.tar#000000002\."):
        build_shards(tars / "web", out, resolution=RES, missing_caption="error")
    assert list(out.iterdir()) == []  # shards written before the end were removed; no index.json


def test_cli_build_prints_a_summary_and_refuses_pipes(tars, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["shards", "build", str(tars / "web"), str(tmp_path / "out"),
                                 "--resolution", "64", "--resolution", "128", "--trigger-word", "ohwx",
                                 "--num-repeats", "3"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "8 samples in 1 shard(s)" in text and "(24 per epoch with repeats [3])" in text
    assert "skipped 3 input(s): 1 no_caption, 1 decode, 1 no_image" in text
    assert "skipped part-000.tar#000000004: no image member" in text
    index = ShardIndex.load(tmp_path / "out")
    assert index.resolutions == [64, 128] and {s.repeats for s in index.shards} == {3}
    refused = runner.invoke(app, ["shards", "build", f"pipe:cat {tars}/web/part-000.tar", str(tmp_path / "p")])
    assert refused.exit_code == 2 and "--allow-shell-urls" in " ".join(refused.output.split())
    assert not (tmp_path / "p").exists()


def test_cli_build_lists_upscaled_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    chelsea = Image.open(DATA / "chelsea.png")
    for i in range(12):  # 40x30 px: smaller than the 64 px bucket
        chelsea.resize((40, 30)).save(src / f"small{i:02d}.png")
        (src / f"small{i:02d}.txt").write_text(f"small cat {i}")
    chelsea.save(src / "large.png")
    (src / "large.txt").write_text("a cat")
    result = CliRunner().invoke(app, ["shards", "build", str(src), str(tmp_path / "out"), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "upscaled 12 sample(s) smaller than their bucket (small_images: upscale; --small-images skip" in text
    assert ("upscaled small00.png: smaller than its bucket at resolution 64: 40x30 px < 64x64, "
            "upscaled 2.13x (small_images: upscale)") in text
    assert "upscaled small09.png" in text and "upscaled small10.png" not in text
    assert f"... and 2 more upscaled; every one is listed in {tmp_path / 'out'}/index.json" in text
    assert "large.png" not in text
    index = ShardIndex.load(tmp_path / "out")
    assert [u.source for u in index.upscaled] == [f"small{i:02d}.png" for i in range(12)]


def test_cli_verify_names_a_corrupt_shard(tars, tmp_path):
    out = tmp_path / "out"
    build_shards(tars / "web", out, resolution=RES, samples_per_shard=2, default_caption="a photo")
    ok = CliRunner().invoke(app, ["shards", "verify", str(out)])
    assert ok.exit_code == 0 and "3 shard(s) match" in " ".join(ok.output.split()), ok.output
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(app, ["shards", "verify", str(out)])
    compact = "".join(bad.output.split())  # rich wraps long paths anywhere
    assert bad.exit_code == 2 and "shard-000001.tar:shardiscorrupt:sha256" in compact, bad.output


def test_cli_merge_combines_datasets_with_their_own_repeats(tars, tmp_path):
    build_shards(tars / "web" / "part-000.tar", tmp_path / "root" / "often", resolution=RES, num_repeats=4,
                 trigger_word="ohwx")
    build_shards(tars / "web" / "part-001.tar", tmp_path / "root" / "once", resolution=RES)
    result = CliRunner().invoke(app, ["shards", "merge", str(tmp_path / "root"),
                                      str(tmp_path / "root" / "often"), str(tmp_path / "root" / "once")])
    assert result.exit_code == 0, result.output
    index = ShardIndex.load(tmp_path / "root")
    assert [(s.name, s.num_samples, s.repeats) for s in index.shards] == [
        ("often/shard-000000.tar", 3, 4), ("once/shard-000000.tar", 1, 1)]
    assert index.samples_per_epoch == 13 and "13 per epoch" in " ".join(result.output.split())
    assert {s.source.split(": ")[0] for s in index.skipped} == {"often"}
    assert index.upscaled == []  # every photo covers its bucket
    again = CliRunner().invoke(app, ["shards", "merge", str(tmp_path / "root"), str(tmp_path / "root" / "once")])
    assert again.exit_code == 2 and "already exists" in again.output
