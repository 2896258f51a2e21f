"""Sample images during training: every `sample.every_n_steps`, a grid of `sample.prompts`
rendered with the in-memory LoRA."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch.distributed as dist

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.trainee import Trainee

log = logging.getLogger("difftrain_dist")


class Sampler:
    """Decides when to sample and writes `run_dir/samples/step_<step>.png`."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.every = recipe.sample.every_n_steps

    def after_step(self, trainee: Trainee, step: int) -> None:
        """All ranks call it after each optimizer step that did not end the run early."""
        if self.every and step % self.every == 0:
            written = render_training_samples(trainee, self.recipe, step)
            if written is not None:
                log.warning("samples at step %d: %s", step, written)


def render_training_samples(trainee: Trainee, recipe: Recipe, step: int) -> Path | None:
    """Render `sample.prompts` with the in-memory LoRA into `run_dir/samples/step_<step>.png`.

    Rank 0 renders and writes; under ZeRO-3, where every rank holds a slice of the weights,
    all ranks run the pipeline together (the forward passes gather the slices) and rank 0
    writes. Noise comes from `sample.seed`, so grids compare across steps; the training RNG
    streams are untouched. Returns the PNG path on rank 0, else None.
    """
    from difftrain_dist.models.sampling import image_grid, render

    rank = dist.get_rank()
    if rank != 0 and recipe.distributed.zero_stage != 3:
        return None
    sample, adapter = recipe.sample, trainee.adapter
    module = trainee.engine.module
    module.eval()
    try:
        with trainee.ema.swapped_in() if trainee.ema is not None else contextlib.nullcontext():
            images = render(
                adapter.pipeline(),
                list(sample.prompts),
                seed=sample.seed,
                steps=sample.num_inference_steps,
                resolution=sample.resolution or recipe.data.resolution // 16 * 16,
                guidance_scale=sample.guidance_scale if sample.guidance_scale is not None
                else adapter.sample_guidance_scale,
            )
    finally:
        module.train()
    if rank != 0:
        return None
    path = recipe.run_dir / "samples" / f"step_{step:09d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path
