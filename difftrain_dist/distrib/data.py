"""The rank's data: its shard stream and loader, and the batches that move the data cursor (the
check that the shards suit the model is in preflight.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import CaptionTransform, ShardIndex, ShardStream
from difftrain_dist.data_shards.cache import dataset_of
from difftrain_dist.distrib.state import TrainState
from difftrain_dist.distrib.trainee import precomputed_text_unusable

log = logging.getLogger("difftrain_dist")


def make_stream(recipe: Recipe, state: TrainState | None = None) -> ShardStream:
    """This rank's stream over `data.shards`, starting at `state`'s data cursor (default: the start)."""
    state = state or TrainState()
    data = recipe.data
    index = ShardIndex.load(data.shards)
    return ShardStream(
        index,
        micro_batch_size=data.micro_batch_size,
        global_rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        seed=recipe.run.seed,
        start_epoch=state.epoch,
        start_batch=state.batch_in_epoch,
        num_workers=data.loader_workers,
        caption_dropout=data.caption_dropout,
        shuffle_captions=data.shuffle_captions,
        keep_tokens=data.keep_tokens,
        trigger_word=data.trigger_word,
        caption_transforms=None if data.datasets is None else per_shard_captions(recipe, index),
    )


def per_shard_captions(recipe: Recipe, index: ShardIndex) -> list[CaptionTransform]:
    """Each shard's caption options: those of the dataset folder it was built from (its
    `dataset-<i>/` prefix in the cache entry), the `data` section's where the folder sets none."""
    data = recipe.data
    transforms = []
    for dataset in data.datasets:
        transforms.append(CaptionTransform(
            data.caption_dropout if dataset.caption_dropout is None else dataset.caption_dropout,
            data.shuffle_captions if dataset.shuffle_captions is None else dataset.shuffle_captions,
            data.keep_tokens if dataset.keep_tokens is None else dataset.keep_tokens,
            data.trigger_word or None))
    return [transforms[dataset_of(shard.name)] for shard in index.shards]


def make_loader(stream: ShardStream, recipe: Recipe) -> DataLoader:
    """The rank's DataLoader over its stream (batches are made by the stream: batch_size None).

    It has its own generator: starting an iterator draws a base seed, which must not come from
    the global torch RNG that LoRA dropout draws from (restored on resume just before)."""
    return DataLoader(stream, batch_size=None, num_workers=recipe.data.loader_workers,
                      generator=torch.Generator().manual_seed(recipe.run.seed))


def cursor_batches(loader: DataLoader, state: TrainState, batches_per_epoch: int) -> Iterator[dict[str, Any]]:
    """The loader's batches; each one drawn moves `state`'s data cursor past it (a checkpoint
    saved after the step that used it resumes with the next one)."""
    for batch in loader:
        state.advance(batch["epoch"], batch["batch_in_epoch"], len(batch["captions"]), batches_per_epoch)
        yield batch


def report_precomputed_use(recipe: Recipe, index: ShardIndex) -> None:
    """Rank 0: say what of the precomputed data this run uses; warn when it came from another model path."""
    pre = index.precomputed
    if pre is None or dist.get_rank() != 0:
        return
    local = Path(recipe.model.path).expanduser()
    model = str(local.resolve()) if local.exists() else str(recipe.model.path)
    if pre.model != model:
        log.warning("data.shards was precomputed with model %s, training uses %s", pre.model, model)
    if pre.conditioning and (reason := precomputed_text_unusable(recipe)):
        log.warning("precomputed text embeddings are not used (%s): captions are encoded at each step; "
                    "the precomputed VAE latents are used", reason)
