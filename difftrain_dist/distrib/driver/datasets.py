"""Image folders of a recipe (`data.datasets`) → the shards a run reads, built once per content."""

from __future__ import annotations

import logging
from collections import Counter

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards.cache import FolderBuild, cached_shards

log = logging.getLogger("difftrain_dist")

CACHE_FOLDER = ".shards-cache"
"""The cache's folder under `run.storage_path` when `data.shards_cache` is not set."""


def build_datasets(recipe: Recipe) -> bool:
    """When the recipe names image folders, point `data.shards` at their shards, building them
    into the cache unless an entry of the same files and options exists; `data.resolution`
    left None becomes the largest resolution built. Call it once per run, before any rank
    starts (the driver; rank 0 under torchrun while the others wait).

    Returns:
        True when shards were built, False when they were reused (or the recipe names shards).

    Raises:
        ValueError: a folder is missing or cannot be built (naming `data.datasets[i]`).
    """
    data = recipe.data
    if data.datasets is None:
        return False
    builds = [FolderBuild(folder=d.folder, resolutions=tuple(d.resolutions or [data.resolution]),
                          caption_ext=d.caption_ext, default_caption=d.default_caption,
                          missing_caption=None if d.default_caption is None else "default",
                          num_repeats=d.num_repeats) for d in data.datasets]
    index, built = cached_shards(builds, data.shards_cache or recipe.run.storage_path / CACHE_FOLDER)
    data.shards = index.root
    if data.resolution is None:
        data.resolution = max(index.resolutions)
    recipe.forget_identity()
    if index.skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(s.kind for s in index.skipped).items()))
        log.warning("%d input(s) of data.datasets are left out (%s); each is listed with its reason under "
                    "'skipped' in %s", len(index.skipped), kinds, index.root / "index.json")
    return built
