"""Tiny random-weight pipelines for tests and the demo, built locally (no downloads).

Each tiny variant has one builder, named in the table of families (families.py); `init_tiny` looks it up, builds the
pipeline with a fixed seed and writes it in diffusers format, so that every later
`from_pretrained(out_dir, subfolder=...)` takes the same code path as a real checkpoint.

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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from difftrain_dist.models.families import TINY_VARIANTS, tiny_builder
from difftrain_dist.models.tiny_tokenizers import (  # noqa: F401  (re-exported: the tiny models' tokenizers)
    BOS_TOKEN,
    EOS_TOKEN,
    OPEN_CLIP_PAD_TOKEN,
    T5_HIDDEN_SIZE,
    T5_MODEL_MAX_LENGTH,
    clip_tokenizers,
    tiny_clip_vocab,
    tiny_t5_tokenizer,
    tiny_t5_vocab,
    write_tiny_clip_tokenizer_files,
)


def _tiny_unet() -> UNet2DConditionModel:
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


def _tiny_vae(
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


def _tiny_clip_config(
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


def _tiny_clip_text_model(vocab: dict[str, int]) -> CLIPTextModel:
    """CLIP-L stand-in without projection: hidden states (B, 77, 32), pooler output (B, 32)."""
    return CLIPTextModel(_tiny_clip_config(vocab))


def _tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
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


def build_sd15(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny SD1.5-architecture pipeline: UNet (32, 64), 4-block VAE (scale 8), 2-layer CLIP."""
    tokenizer_dir = write_tiny_clip_tokenizer_files(work_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    unet = _tiny_unet()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = _tiny_clip_text_model(tokenizer.get_vocab())
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
    text_config = _tiny_clip_config(vocab)
    text_config_2 = _tiny_clip_config(vocab, hidden_size=64, hidden_act="gelu", pad_token=OPEN_CLIP_PAD_TOKEN)
    addition_time_embed_dim = 8  # 256 in SDXL
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
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
        cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=text_config_2.projection_dim + 6 * addition_time_embed_dim,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(scaling_factor=0.13025)
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
    text_config = _tiny_clip_config(vocab)
    text_config_2 = _tiny_clip_config(vocab, hidden_size=64, hidden_act="gelu", pad_token=OPEN_CLIP_PAD_TOKEN)
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
    vae = _tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    torch.manual_seed(seed + 4)
    text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3))
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
    text_config = _tiny_clip_config(tokenizer.get_vocab())
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
    vae = _tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 4)  # seed + 4 is the T5 encoder's in every architecture
    text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2))
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


TINY_ARCHS: tuple[str, ...] = TINY_VARIANTS


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
