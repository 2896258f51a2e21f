"""The tiny SDXL pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .parts import tiny_clip_config, tiny_vae
from .tokenizers import EOS_TOKEN, OPEN_CLIP_PAD_TOKEN, clip_tokenizers


def build_sdxl(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny SDXL-architecture pipeline (layout of stabilityai/stable-diffusion-xl-base-1.0).

    UNet (32, 64) with a plain first block and a cross-attention second block (2 transformer
    layers there and in the mid block, linear projections, 16-dim heads), cross-attention on
    the two encoders' penultimate hidden states concatenated (32 + 64 = 96), and "text_time"
    added conditioning: pooled text_encoder_2 embedding (64) + 6 size/crop ids × 8 = 112.
    VAE: 4 latent channels, 1/8 pixel size, scaling factor 0.13025.
    """
    tokenizer, tokenizer_2 = clip_tokenizers(
        work_dir, "tokenizer", "tokenizer_2", pad_tokens=(EOS_TOKEN, OPEN_CLIP_PAD_TOKEN)
    )
    vocab = tokenizer.get_vocab()
    text_config = tiny_clip_config(vocab)
    text_config_2 = tiny_clip_config(vocab, hidden_size=64, hidden_act="gelu", pad_token=OPEN_CLIP_PAD_TOKEN)
    torch.manual_seed(seed)
    unet = _sdxl_unet(text_config.hidden_size + text_config_2.hidden_size, text_config_2.projection_dim)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(scaling_factor=0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    # SDXL base's scheduler/scheduler_config.json (the same betas as SD1.5).
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """SDXL's UNet layout at tiny widths; "text_time" conditioning of the pooled embedding
    (`pooled_dim`) and 6 size/crop ids of 8 dims each (256 in SDXL)."""
    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # diffusers' name for the number of heads: 16-dim heads
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim,
        norm_num_groups=32,
    )
