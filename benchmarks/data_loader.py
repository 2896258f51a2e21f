"""Loader throughput: our streaming reader against a plain PIL folder loader on the same real
photographs, one process each (samples/s per core), at a training resolution of 512 px.

    python -m benchmarks.data_loader
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks.common import write_result
from difftrain_dist.data_shards import ShardStream, build_shards
from difftrain_dist.data_shards.examples import write_example_folder

RESOLUTION = 512
BATCH = 4


def pil_folder_batches(folder: Path, resolution: int, batch: int):
    """The loader a single-GPU trainer typically has: open each file, orient, convert, resize to
    cover, centre-crop, to a [-1, 1] float tensor; captions from the same-stem .txt."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    while True:
        for start in range(0, len(files) - batch + 1, batch):
            pixels, captions = [], []
            for path in files[start:start + batch]:
                with Image.open(path) as img:
                    img = ImageOps.exif_transpose(img).convert("RGB")
                    img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS)
                pixels.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
            yield {"pixel_values": torch.stack(pixels).float() / 127.5 - 1, "captions": captions}


def samples_per_s(batches, seconds: float = 8.0) -> float:
    """Samples/s over at least `seconds` of iteration (after one warm-up batch)."""
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["captions"])
    return count / (time.perf_counter() - start)


def main() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photos, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        write_example_folder(photos)
        # square buckets only (max_aspect 1), the same crops the PIL baseline makes
        build_shards(photos, shards, resolution=RESOLUTION, samples_per_shard=8, max_aspect=1.0)
        stream = ShardStream(shards, micro_batch_size=BATCH, global_rank=0, world_size=1, seed=0)
        ours = samples_per_s(iter(stream))
        baseline = samples_per_s(pil_folder_batches(photos, RESOLUTION, BATCH))
    result = {"resolution": RESOLUTION, "ours_samples_per_s_per_core": ours,
              "pil_folder_samples_per_s_per_core": baseline, "ratio": ours / baseline}
    print(f"data loader @ {RESOLUTION}px, 1 core: streaming shards {ours:.1f} samples/s, "
          f"PIL folder {baseline:.1f} samples/s, ratio {ours / baseline:.2f} (target >= 1.0)")
    write_result("data_loader", result)
    return result


if __name__ == "__main__":
    main()
