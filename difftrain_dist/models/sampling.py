"""Render sample images with a diffusers pipeline: from a model folder (plus a LoRA file), or
from a training adapter's in-memory pipeline (LoRA as currently trained)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from difftrain_dist.quiet import quiet_diffusers_progress

quiet_diffusers_progress()


@torch.no_grad()
def render(
    pipe: DiffusionPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 20,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
) -> list[Image.Image]:
    """One image per prompt from `pipe`, each prompt's initial noise drawn from its own CPU
    generator seeded `seed + i`, so a grid is the same on any device and at any step.

    `resolution`: image side in px (a multiple of 16 suits every architecture); None uses the
    pipeline's default size. Leaves the global RNG state untouched. Returns PIL RGB images.
    """
    with torch.random.fork_rng(devices=[]):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(
            prompts,
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            guidance_scale=guidance_scale,
            generator=generators,
        ).images


def render_samples(
    model_path: str,
    prompts: list[str],
    *,
    pipeline_class: type[DiffusionPipeline],
    lora: Path | None = None,
    seed: int = 0,
    steps: int = 20,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    device: str = "cpu",
) -> list[Image.Image]:
    """`render` with `pipeline_class.from_pretrained(model_path)` on `device` (fp32 on CPU, bf16
    on CUDA), after `load_lora_weights(lora)` when a LoRA `.safetensors` file is given. A LoRA
    whose header records a prediction type (`modelspec.prediction_type`, e.g. a v-prediction
    LoRA on an epsilon model) gets the model's scheduler with that prediction type."""
    from difftrain_dist.models.lora_formats import lora_prediction_type

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    pipe = pipeline_class.from_pretrained(model_path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        trained = lora_prediction_type(lora)
        if trained is not None and pipe.scheduler.config.get("prediction_type") not in (None, trained):
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=trained)
    return render(pipe, prompts, seed=seed, steps=steps, resolution=resolution, guidance_scale=guidance_scale)


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into one grid image (row-major)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
