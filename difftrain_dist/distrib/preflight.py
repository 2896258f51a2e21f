"""Checks a driver makes before anything starts, cheap to import (no torch, no diffusers)."""

from __future__ import annotations

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards.index import ShardIndex
from difftrain_dist.models.families import get_family


def check_data_fits_model(recipe: Recipe, index: ShardIndex) -> None:
    """The shards suit the model. Raises ValueError when they were precomputed for another
    architecture, or hold a bucket whose sides the architecture cannot take (SD3 and FLUX need
    multiples of 16 px: 2×2 latent patches)."""
    arch = recipe.model.arch
    pre = index.precomputed
    if pre is not None and pre.arch != arch:
        raise ValueError(f"data.shards: {recipe.data.shards} was precomputed for arch {pre.arch!r}, but model.arch "
                         f"is {arch!r}; run `difftrain-dist shards precompute {recipe.data.shards} MODEL` again")
    multiple = get_family(arch).pixel_multiple
    bad = [name for name in index.bucket_names if any(int(side) % multiple for side in name.split("x"))]
    if bad:
        raise ValueError(f"data.shards: buckets {bad} have sides that are not multiples of {multiple} px, which "
                         f"{arch} needs; rebuild the shards with --bucket-step {max(multiple, 64)}")
