"""The tiny FLUX.1 pipelines (dev and schnell)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from .parts import tiny_clip_config, tiny_t5_encoder, tiny_vae
from .tokenizers import T5_HIDDEN_SIZE, clip_tokenizers, tiny_t5_tokenizer


def _build_flux(
    seed: int, work_dir: Path, guidance_embeds: bool, scheduler: FlowMatchEulerDiscreteScheduler
) -> DiffusionPipeline:
    """Tiny FLUX.1 pipeline: MMDiT with 1 double + 1 single block, 2 heads of 16 (32 wide).

    Input: 16 latent channels packed 2×2 → 64 channels per token (patch_size 1); RoPE axes
    (4, 6, 6) summing to the head dim; context = T5 states (128 = joint_attention_dim);
    pooled = CLIP-L pooler output (32). VAE: 16 latent channels, 1/8 pixel size, scaling
    0.3611, shift 0.1159, no quant convs. Height and width must be multiples of 16.
    """
    (tokenizer,) = clip_tokenizers(work_dir, "tokenizer")
    tokenizer_2 = tiny_t5_tokenizer()
    text_config = tiny_clip_config(tokenizer.get_vocab())
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN_SIZE,
        pooled_projection_dim=text_config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 4)  # seed + 4 is the T5 encoder's in every architecture
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2))
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _flux_scheduler(*, shift: float, use_dynamic_shifting: bool) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's FlowMatchEulerDiscreteScheduler config (black-forest-labs/FLUX.1-dev and -schnell
    scheduler/scheduler_config.json differ only in shift and use_dynamic_shifting)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=shift,
        use_dynamic_shifting=use_dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux_dev(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny FLUX.1-dev: guidance-distilled (`guidance_embeds=True`), resolution-dependent shift."""
    scheduler = _flux_scheduler(shift=3.0, use_dynamic_shifting=True)
    return _build_flux(seed, work_dir, guidance_embeds=True, scheduler=scheduler)


def build_flux_schnell(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny FLUX.1-schnell: no guidance embedding, fixed shift 1.0 (no dynamic shifting)."""
    scheduler = _flux_scheduler(shift=1.0, use_dynamic_shifting=False)
    return _build_flux(seed, work_dir, guidance_embeds=False, scheduler=scheduler)
