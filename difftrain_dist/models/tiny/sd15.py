"""The tiny SD1.5 pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from .parts import tiny_clip_text_model, tiny_unet, tiny_vae
from .tokenizers import write_tiny_clip_tokenizer_files


def build_sd15(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny SD1.5-architecture pipeline: UNet (32, 64), 4-block VAE (scale 8), 2-layer CLIP."""
    tokenizer_dir = write_tiny_clip_tokenizer_files(work_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip_text_model(tokenizer.get_vocab())
    # SD1.5's training schedule (CompVis v1-inference.yaml: linear_start/linear_end, 1000 steps).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
