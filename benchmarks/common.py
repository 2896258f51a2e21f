"""Shared set-up for benchmarks: tiny model, real-photo shards, a one-rank gloo process group."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from difftrain_dist.data_shards import build_shards
from difftrain_dist.data_shards.examples import write_example_folder
from difftrain_dist.models import init_tiny

RESULTS = Path("build/bench")


def machine() -> str:
    """One line naming the machine the numbers come from."""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def tiny_assets(root: Path, resolution: int = 64) -> tuple[Path, Path]:
    """(tiny SD1.5 model folder, shards folder of the scikit-image photographs), built once."""
    model, shards = root / "tiny-sd15", root / "shards"
    if not (model / "model_index.json").is_file():
        init_tiny("sd15", model, seed=0)
    if not (shards / "index.json").is_file():
        photos = root / "photos"
        write_example_folder(photos)
        build_shards(photos, shards, resolution=resolution, samples_per_shard=8)
    return model, shards


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_rank_group(backend: str = "gloo"):
    """A world-size-1 process group in this process (what torchrun would set up): gloo on CPU,
    or "nccl" on GPU 0."""
    port = free_port()
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(0)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def timed(fn, repeats: int = 1) -> float:
    """Median wall seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_result(name: str, result: dict) -> Path:
    """Write `build/bench/<name>.json` with the machine line added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    return path
