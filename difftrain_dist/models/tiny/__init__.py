"""Tiny random-weight pipelines for tests and the demo, built locally (no downloads).

Each tiny variant has one builder in this package's module of its family, named in the table of
families (families.py); `init_tiny` looks it up, builds the pipeline with a fixed seed and
writes it in diffusers format, so that every later `from_pretrained(out_dir, subfolder=...)`
takes the same code path as a real checkpoint.

The tiny models keep the real checkpoints' layout and every size that the pipelines
cross-check (latent channels, VAE scale 8, scaling/shift factors, text-embedding widths,
CLIP's 77 positions, schedulers), but with hidden sizes of 32-128 and 1-2 layers:

| arch           | denoiser                       | latents (ch, /px) | text encoders (out dims)                  |
|----------------|--------------------------------|-------------------|-------------------------------------------|
| "sd15"         | UNet (32, 64)                  | 4, 1/8            | CLIP 32                                   |
| "sdxl"         | UNet (32, 64), text_time       | 4, 1/8            | CLIP 32 + CLIP-proj 64 (pooled 64)        |
| "sd3"          | SD3 MMDiT, 2 layers, 32 wide   | 16, 1/8           | CLIP-proj 32 + CLIP-proj 64 + T5 128      |
| "flux"         | FLUX MMDiT 1+1 layers, 32 wide | 16, 1/8, 2x2 pack | CLIP 32 (pooled) + T5 128                 |
| "flux-schnell" | as "flux", no guidance embed   | 16, 1/8, 2x2 pack | CLIP 32 (pooled) + T5 128                 |
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain_dist.models.families import TINY_VARIANTS, tiny_builder

TINY_ARCHS = TINY_VARIANTS
"""Every name `init_tiny` builds."""


def init_tiny(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random pipeline of architecture `arch` and save it to `out_dir`.

    `arch` is one of `TINY_ARCHS`: "sd15", "sdxl", "sd3", "flux" (FLUX.1-dev) or
    "flux-schnell". The folder is a diffusers `save_pretrained` layout (model_index.json,
    unet/ or transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/; safetensors
    weights, fp32) that `DiffusionPipeline.from_pretrained(out_dir)` loads as the matching
    pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline, FluxPipeline). Weights depend only on `seed`; the caller's
    global torch RNG state is left untouched.

    CLIP tokenizers are a byte-level BPE CLIP tokenizer made here (see `tiny_clip_vocab`);
    T5 tokenizers are a Unigram tokenizer made here (see `tiny_t5_tokenizer`). Every VAE has
    4 blocks so that latents are 1/8 of the pixel size.

    Raises ValueError if `arch` is not one of `TINY_ARCHS`.
    Returns `out_dir`.
    """
    build = tiny_builder(arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        pipeline = build(seed, out_dir)
        pipeline.save_pretrained(out_dir)
    return out_dir
