"""Model folders for the step benchmarks: the tiny SD1.5, and a CPU stand-in for SDXL's per-step
regime (SDXL's block structure at full depth, tiny widths)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from benchmarks.common import tiny_assets
from difftrain_dist.data_shards import build_shards
from difftrain_dist.data_shards.examples import write_example_folder
from difftrain_dist.models import init_tiny

LAYOUTS = ("sd15", "sdxl")
RESOLUTION = {"sd15": 64, "sdxl": 128}
"""Image side per layout, px: the SDXL stand-in trains on 16×16 latents."""


def sdxl_full_depth_unet(cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet structure at widths 32/64/128: three down
    blocks (plain, then cross-attention with 2 and 10 transformer layers), `layers_per_block` 2,
    a 10-layer mid block, and the mirrored up blocks (3 layers each). That is SDXL's 70
    transformer blocks, and 1,120 LoRA tensors with the attention targets at any rank; 16-dim
    heads, "text_time" added conditioning of 6 size/crop ids × 8 dims."""
    time_dim = 8
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=32,
    )


def layout_assets(root: Path, layout: str) -> tuple[Path, Path]:
    """(model folder, shards folder of the scikit-image photographs at the layout's resolution),
    built once under `root`. Raises ValueError for a layout not in LAYOUTS."""
    if layout == "sd15":
        return tiny_assets(root)
    if layout != "sdxl":
        raise ValueError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    model, shards = root / "sdxl-full-depth", root / f"shards-{RESOLUTION['sdxl']}"
    if not (model / "model_index.json").is_file():
        tiny = StableDiffusionXLPipeline.from_pretrained(str(init_tiny("sdxl", root / "tiny-sdxl", seed=0)))
        torch.manual_seed(0)
        unet = sdxl_full_depth_unet(tiny.unet.config.cross_attention_dim,
                                    tiny.text_encoder_2.config.projection_dim)
        StableDiffusionXLPipeline(**{**tiny.components, "unet": unet}).save_pretrained(str(model))
    if not (shards / "index.json").is_file():
        photos = root / "photos"
        if not photos.is_dir():
            write_example_folder(photos)
        build_shards(photos, shards, resolution=RESOLUTION["sdxl"], samples_per_shard=8)
    return model, shards
