"""The tiny SD3 pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection

from .parts import tiny_clip_config, tiny_t5_encoder, tiny_vae
from .tokenizers import EOS_TOKEN, OPEN_CLIP_PAD_TOKEN, T5_HIDDEN_SIZE, clip_tokenizers, tiny_t5_tokenizer


def build_sd3(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny SD3-architecture pipeline (layout of stabilityai/stable-diffusion-3-medium-diffusers).

    MMDiT: 2 joint blocks (the last one context-pre-only), 4 heads of 8 (32 wide), patch 2 on
    16 latent channels; context = CLIP-L (32) and CLIP-G (64) penultimate states concatenated
    and zero-padded to T5's 128 (joint_attention_dim), followed by the T5 states along the
    sequence; pooled = CLIP-L + CLIP-G projections (32 + 64 = 96). VAE: 16 latent channels,
    1/8 pixel size, scaling 1.5305, shift 0.0609, no quant convs. text_encoder_3/tokenizer_3
    (T5) may be dropped at load time, as for the real model.
    """
    tokenizer, tokenizer_2 = clip_tokenizers(
        work_dir, "tokenizer", "tokenizer_2", pad_tokens=(EOS_TOKEN, OPEN_CLIP_PAD_TOKEN)
    )
    tokenizer_3 = tiny_t5_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config = tiny_clip_config(vocab)
    text_config_2 = tiny_clip_config(vocab, hidden_size=64, hidden_act="gelu", pad_token=OPEN_CLIP_PAD_TOKEN)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN_SIZE,
        caption_projection_dim=32,
        pooled_projection_dim=text_config.projection_dim + text_config_2.projection_dim,
        pos_embed_max_size=64,  # 64 patches of 2 latents: up to 1024 px
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    torch.manual_seed(seed + 4)
    text_encoder_3 = tiny_t5_encoder(len(tokenizer_3))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
