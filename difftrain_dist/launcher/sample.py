"""`difftrain-dist sample MODEL PROMPT`: render images, with or without a LoRA file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors
from difftrain_dist.models.families import FAMILY_NAMES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def sample(
    model: Annotated[str, typer.Argument(help="Diffusers model folder or hub id.")],
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts (one image each, in a grid).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")],
    lora: Annotated[Path | None, typer.Option(help="LoRA .safetensors file to load.")] = None,
    arch: Annotated[
        str | None, typer.Option(help=f"Model architecture: {', '.join(FAMILY_NAMES)} (default: read from the model).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    resolution: Annotated[
        int | None, typer.Option(help="Image side in pixels (default: the model's native size).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: cuda when there is one).")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Guidance scale (default: the architecture's usual one).")
    ] = None,
) -> None:
    """Render one image per PROMPT with the model's pipeline (and LoRA) into a PNG grid."""
    import torch

    from difftrain_dist.models import get_adapter
    from difftrain_dist.models.lora_formats import check_lora_fits
    from difftrain_dist.models.registry import checked_arch
    from difftrain_dist.models.sampling import image_grid, render_samples

    with user_errors():
        if lora is not None and not lora.is_file():
            raise ValueError(f"--lora: no such file {lora}")
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--out: {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
        adapter = get_adapter(checked_arch(model, arch))
        if lora is not None:
            check_lora_fits(lora, adapter.arch)
        guidance = adapter.sample_guidance_scale if guidance_scale is None else guidance_scale
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            images = render_samples(model, prompt, pipeline_class=adapter.pipeline_class, lora=lora, seed=seed,
                                    steps=steps, resolution=resolution, guidance_scale=guidance, device=device)
        except OSError as err:
            raise ValueError(f"cannot load {lora or model}: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    console.print(f"wrote {out}")
