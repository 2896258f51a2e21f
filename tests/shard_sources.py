"""A shard store built from real skimage photographs plus broken and odd files, shared by the
build and reader tests (`built`, `samples`), and the helpers that write such sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from difftrain_dist.data_shards import ShardIndex, build_shards

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


def caption_for(name: str) -> str:
    return f"a photo: {Path(name).stem} ✓"


def write_input(folder: Path, name: str, img: Image.Image | None = None, caption: bool = True,
           **save_kw) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is not None:
        img.save(path, **save_kw)
    if caption:
        path.with_suffix(".txt").write_text(caption_for(name) + "\n", encoding="utf-8")
    return path


def make_source(folder: Path) -> None:
    for name, original in PHOTOS.items():
        write_input(folder, name).write_bytes((DATA / original).read_bytes())
    astronaut, chelsea = Image.open(DATA / "astronaut.png"), Image.open(DATA / "chelsea.png")
    camera = np.asarray(Image.open(DATA / "camera.png"))
    write_input(folder, "cmyk.jpg", astronaut.convert("CMYK"), format="JPEG", quality=95)
    write_input(folder, "palette.png", chelsea.quantize(32))
    half = Image.open(DATA / "coffee.png").convert("RGBA")
    alpha = np.full(half.size[::-1], 255, np.uint8)
    alpha[:, : half.size[0] // 2] = 0  # left half fully transparent
    half.putalpha(Image.fromarray(alpha))
    write_input(folder, "half_transparent.png", half)
    write_input(folder, "palette_transparent.png", half.quantize(64))
    write_input(folder, "sixteen_bit.png", Image.fromarray(camera.astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    write_input(folder, "exif_rotated.jpg", chelsea.transpose(Image.Transpose.ROTATE_90),
           format="JPEG", quality=95, exif=exif.tobytes())
    write_input(folder, "empty.jpg").write_bytes(b"")
    write_input(folder, "garbage.jpg").write_bytes(b"not an image, whatever its name says")
    rocket = (DATA / "rocket.jpg").read_bytes()
    write_input(folder, "truncated.jpg").write_bytes(rocket[: len(rocket) // 2])
    write_input(folder, "no_caption.png", caption=False).write_bytes((DATA / "coins.png").read_bytes())
    write_input(folder, "bad_caption.png", caption=False).write_bytes((DATA / "moon.png").read_bytes())
    (folder / "bad_caption.txt").write_bytes("café".encode("latin-1"))
    (folder / "notes.md").write_text("not an image")
    # a.jpg and a.png would share a.txt: the first by name is kept, the other reported.
    write_input(folder, "dup.jpg", astronaut.convert("RGB"), format="JPEG", quality=90)
    write_input(folder, "dup.png", chelsea, caption=False)
    write_input(folder, "tiny.png", chelsea.resize((20, 13)))  # smaller than every bucket: upscaled by default
    write_input(folder, "trigger.png", chelsea.rotate(180), caption=False)
    (folder / "trigger.txt").write_text("[trigger], a cat upside down, [name] again", encoding="utf-8")
    (folder / ".hidden.png").write_bytes(b"ignored")


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, Path, ShardIndex]:
    root = tmp_path_factory.mktemp("build")
    make_source(root / "src")
    index = build_shards(root / "src", root / "out", resolution=RES, samples_per_shard=5, trigger_word=TRIGGER)
    return root / "src", root / "out", index


@pytest.fixture(scope="session")
def samples(built) -> list[dict]:
    """Every sample of the build, in shard order: {"key", "meta", "caption", "pixels"}."""
    _, out, index = built
    rows = []
    for shard in index.shards:
        for key, members in sorted(read_tar(out / shard.name).items()):
            assert sorted(members) == ["jpg", "json", "txt"]
            rows.append({"key": key, "meta": json.loads(members["json"]),
                         "caption": members["txt"].decode("utf-8"),
                         "pixels": np.asarray(Image.open(io.BytesIO(members["jpg"])))})
    return rows


EMPTY_INDEX = '{"version": 2, "resolutions": [], "num_samples": 0, "shards": [], "buckets": {}}'
"""A valid index.json of no shards: recipes validate against it without building any."""
