"""Shared checks: run a UNet on fixed inputs, and merge a diffusers LoRA file into a UNet by hand."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from difftrain_dist.models import read_lora_file


def randomize_lora(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Give every lora_A/lora_B weight of `module` values N(0, scale²) (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def fixed_unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [2, 4, 8, 8], timesteps [2], encoder_hidden_states [2, 77, 32] from a fixed seed."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500])
    encoder_hidden_states = torch.randn(2, 77, 32, generator=generator)
    return latents, timesteps, encoder_hidden_states


@torch.no_grad()
def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    """The UNet's prediction on :func:`fixed_unet_inputs`."""
    latents, timesteps, encoder_hidden_states = fixed_unet_inputs()
    return unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states).sample


def outputs_without_and_with_lora(model: Path, lora_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline UNet's prediction before and after `pipeline.load_lora_weights(lora_file)`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(lora_file))
    return base, unet_output(pipe.unet)


def lora_scale(header: dict[str, str], prefix: str = "unet") -> float:
    """alpha / r read from the file's `lora_adapter_metadata` header."""
    config = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    return config[f"{prefix}.lora_alpha"] / config[f"{prefix}.r"]


@torch.no_grad()
def hand_merged_unet(model: Path, lora_file: Path) -> tuple[UNet2DConditionModel, int]:
    """A fresh UNet with W' = W + (alpha / r) · B @ A applied for every LoRA pair in the file.

    Returns the UNet and the number of Linear layers merged.
    """
    tensors, header = read_lora_file(lora_file)
    scale = lora_scale(header)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    merged = 0
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
        unet.get_submodule(module_path).weight += scale * (lora_b @ lora_a)
        merged += 1
    return unet, merged
