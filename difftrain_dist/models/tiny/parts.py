"""Building blocks the tiny pipelines share: UNet, VAE, CLIP and T5 text encoders."""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tokenizers import BOS_TOKEN, EOS_TOKEN, T5_HIDDEN_SIZE


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae(
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    use_quant_conv: bool = True,
) -> AutoencoderKL:
    """4 blocks → 3 downsamplings → latents at 1/8 of the pixel size, as in real SD.

    The defaults are SD1.5's VAE (4 channels, scale 0.18215, quant convs). The pipelines encode
    `latents = (vae_latents - shift_factor) * scaling_factor` (shift 0 when None).
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
    )


def tiny_clip_config(
    vocab: dict[str, int], hidden_size: int = 32, hidden_act: str = "quick_gelu", pad_token: str = EOS_TOKEN
) -> CLIPTextConfig:
    """CLIP text tower with 2 layers, 4 heads, 77 positions; `projection_dim == hidden_size`.

    Defaults: CLIP ViT-L/14 style (32 wide, quick_gelu). The OpenCLIP bigG stand-in is
    `hidden_size=64, hidden_act="gelu", pad_token="!"`.
    """
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size + 5,  # 37 for 32 wide: odd on purpose, as in diffusers' tests
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )


def tiny_clip_text_model(vocab: dict[str, int]) -> CLIPTextModel:
    """CLIP-L stand-in without projection: hidden states (B, 77, 32), pooler output (B, 32)."""
    return CLIPTextModel(tiny_clip_config(vocab))


def tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    """T5 v1.1 (gated-gelu, untied) encoder stand-in: 2 layers, d_model 128, 4 heads of 16.

    Output: last hidden state (B, seq, 128) for any seq (relative position buckets). 128 is
    wider than SD3's concatenated CLIP states (32 + 64), as T5-XXL's 4096 is wider than 2048.
    """
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_HIDDEN_SIZE,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)
