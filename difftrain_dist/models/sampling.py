"""Render sample images with a diffusers pipeline, optionally with a LoRA file loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def render_samples(
    model_path: str,
    prompts: list[str],
    *,
    pipeline_class,
    lora: Path | None = None,
    seed: int = 0,
    steps: int = 20,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    device: str = "cpu",
) -> list[Image.Image]:
    """One image per prompt from `pipeline_class.from_pretrained(model_path)`.

    Args:
        lora: a LoRA `.safetensors` file, loaded with the pipeline's `load_lora_weights`.
        seed: seeds the initial latents (same seed, same noise with and without the LoRA).
        steps: denoising steps of the pipeline's scheduler.
        resolution: image side in pixels (multiple of the VAE scale factor); None uses the
            model's native size (UNet sample size × VAE scale factor).

    Returns:
        PIL RGB images, square.
    """
    pipe = pipeline_class.from_pretrained(model_path, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(
        prompts,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        guidance_scale=guidance_scale,
        generator=generator,
    ).images


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into one grid image (row-major)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
