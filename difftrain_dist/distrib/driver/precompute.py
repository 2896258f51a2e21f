"""`shards precompute`: VAE latent parameters and text embeddings of every sample, as Ray work.

A pool of Ray actors (`ray.util.ActorPool`), each loading the model adapter once on CPU, encodes
one shard per task and writes the shard's sidecar tar next to it (see data_shards/precomputed.py).
The driver then records the sidecars in index.json. Shards and sidecars must be on storage every
Ray node sees at the same path (as training already needs for `data.shards`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util import ActorPool

from difftrain_dist.data_shards.files import sha256_file
from difftrain_dist.data_shards.index import Precomputed, ShardIndex, SidecarInfo
from difftrain_dist.data_shards.precomputed import sidecar_name, write_sidecar
from difftrain_dist.data_shards.reader import read_shard_images, to_pixel_values
from difftrain_dist.models import get_adapter

log = logging.getLogger("difftrain_dist")

ENCODE_BATCH = 8
"""Images of one bucket the VAE encodes at once (per actor)."""


@dataclass(frozen=True)
class ShardResult:
    """What one task did: the shard's index, its sidecar, and where it ran."""

    shard: int
    sidecar: str
    """Sidecar name relative to the index folder."""
    sha256: str
    num_samples: int
    conditioning: tuple[str, ...]
    pid: int
    """Process id of the actor that encoded the shard."""
    host: str
    seconds: float


class ShardEncoder:
    """One Ray actor: the adapter, loaded once on CPU in float32, encodes whole shards."""

    def __init__(self, index_dir: str, model_path: str, arch: str):
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.index = ShardIndex.load(index_dir)
        self.adapter = get_adapter(arch).from_pretrained(model_path, dtype=torch.float32,
                                                         device=torch.device("cpu"))

    def encode_shard(self, shard: int) -> ShardResult:
        """Write shard `shard`'s sidecar (every sample, in tar order) and return what was done."""
        start = time.perf_counter()
        name = sidecar_name(self.index.shards[shard].name)
        path = self.index.root / name
        records = list(self._records(shard))
        write_sidecar(path, records)
        return ShardResult(shard, name, sha256_file(path), len(records),
                           tuple(records[0][2]) if records else (), os.getpid(), socket.gethostname(),
                           time.perf_counter() - start)

    def _records(self, shard: int) -> Iterator[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
        """(key, latent parameters [2C, h, w], {name: conditioning row}) in tar order; the VAE and
        text encoder see batches of up to ENCODE_BATCH consecutive samples of one image size."""
        group: list[tuple[str, np.ndarray, str]] = []
        for sample in read_shard_images(self.index, shard):
            if group and (len(group) == ENCODE_BATCH or group[0][1].shape != sample[1].shape):
                yield from self._encode(group)
                group = []
            group.append(sample)
        if group:
            yield from self._encode(group)

    @torch.no_grad()
    def _encode(self, group: list[tuple[str, np.ndarray, str]]):
        pixels = to_pixel_values(np.stack([image for _, image, _ in group]))
        latents = self.adapter.latent_parameters(pixels).float().cpu().numpy()
        conditioning = {name: value.float().cpu().numpy()
                        for name, value in self.adapter.encode_prompts([c for _, _, c in group]).items()}
        for i, (key, _, _) in enumerate(group):
            yield key, latents[i], {name: value[i] for name, value in conditioning.items()}


def precompute_shards(shards_dir: str | os.PathLike[str], model_path: str, *, arch: str,
                      num_workers: int | None = None) -> list[ShardResult]:
    """Encode every shard of `shards_dir` on a pool of Ray actors and record the sidecars in its
    index.json (`precomputed` block). Ray must be initialised (see ray_cluster.init_ray).

    Args:
        shards_dir: folder holding index.json (or the file itself).
        model_path: diffusers folder or hub id the adapter loads (a local path is made absolute,
            since actors may run elsewhere).
        arch: adapter registry name.
        num_workers: actors (1 CPU each); default min(shards, CPUs in the cluster).

    Returns the per-shard results in shard order (`pid`/`host` say which actor did each).

    Raises:
        ValueError: a bad index, arch or model path, or num_workers < 1.
    """
    index = ShardIndex.load(shards_dir)
    get_adapter(arch)  # unknown arch: fail before starting actors
    local = Path(model_path).expanduser()
    model = str(local.resolve()) if local.exists() else str(model_path)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(len(index.shards), cpus) if num_workers is None else num_workers
    if workers < 1:
        raise ValueError(f"num_workers: expected an int >= 1, found {num_workers!r}")
    actor_class = ray.remote(num_cpus=1)(ShardEncoder)
    actors = [actor_class.remote(str(index.root.resolve()), model, arch) for _ in range(workers)]
    try:
        pool = ActorPool(actors)
        results = sorted(pool.map_unordered(lambda a, i: a.encode_shard.remote(i), range(len(index.shards))),
                         key=lambda r: r.shard)
    finally:
        for actor in actors:
            ray.kill(actor)
    names = {r.conditioning for r in results if r.num_samples}
    if len(names) != 1:
        raise ValueError(f"shards precompute: actors returned different conditioning names {sorted(names)}")
    index.precomputed = Precomputed(model=model, arch=arch, conditioning=names.pop(),
                                    sidecars=tuple(SidecarInfo(name=r.sidecar, sha256=r.sha256) for r in results))
    index.save(index.root)
    log.info("precomputed %d shards on %d actor(s) in %d process(es)", len(results), workers,
             len({(r.host, r.pid) for r in results}))
    return results


def run_precompute(shards_dir: str | os.PathLike[str], model_path: str, *, arch: str,
                   address: str | None = None, num_workers: int | None = None) -> list[ShardResult]:
    """`precompute_shards` on the cluster at `address` (or RAY_ADDRESS), else on an embedded local
    one that is shut down afterwards."""
    from difftrain_dist.distrib.driver.ray_cluster import init_ray

    ShardIndex.load(shards_dir)  # fail on a bad folder or arch before starting a cluster
    get_adapter(arch)
    started = not ray.is_initialized()
    init_ray(address, num_workers or 1)
    try:
        return precompute_shards(shards_dir, model_path, arch=arch, num_workers=num_workers)
    finally:
        if started:
            ray.shutdown()


def summary(results: list[ShardResult]) -> dict[str, Any]:
    """Counts for the CLI: samples, shards, distinct actor processes, encode seconds."""
    return {"samples": sum(r.num_samples for r in results), "shards": len(results),
            "processes": len({(r.host, r.pid) for r in results}),
            "seconds": sum(r.seconds for r in results)}
