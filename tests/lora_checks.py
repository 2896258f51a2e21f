"""Shared checks: run a UNet on fixed inputs, and merge a LoRA file (either layout) into a UNet by hand."""

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


def lora_pairs(lora_file: Path, module: torch.nn.Module, *, component: str = "unet",
               kohya_prefix: str = "lora_unet") -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """Read a LoRA file of either layout as a loader does, without our writer's code:
    `{module path in module: (scale, up [out, r], down [r, in])}`.

    peft keys (`<component>.<path>.lora_A.weight` / `.lora_B.weight`): scale alpha / r from the
    `lora_adapter_metadata` header. kohya keys (`<kohya_prefix>_<path with _>.lora_down.weight` /
    `.lora_up.weight` / `.alpha`): the path is found among `module`'s submodule names with dots
    read as underscores (the way ComfyUI and A1111 match them), scale `.alpha` / r (1 without it).
    Keys of other components are ignored.
    """
    tensors, header = read_lora_file(lora_file)
    pairs: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
    if any(key.endswith(".lora_A.weight") for key in tensors):
        scale = lora_scale(header, component)
        for key, down in tensors.items():
            if key.startswith(f"{component}.") and key.endswith(".lora_A.weight"):
                path = key.removeprefix(f"{component}.").removesuffix(".lora_A.weight")
                pairs[path] = (scale, tensors[key.replace(".lora_A.", ".lora_B.")], down)
        return pairs
    by_underscores = {name.replace(".", "_"): name for name, _ in module.named_modules() if name}
    for key, down in tensors.items():
        if key.startswith(f"{kohya_prefix}_") and key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            up = tensors[f"{stem}.lora_up.weight"]
            alpha = tensors.get(f"{stem}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            pairs[by_underscores[stem.removeprefix(f"{kohya_prefix}_")]] = (scale, up, down)
    return pairs


@torch.no_grad()
def hand_merged_unet(model: Path, lora_file: Path) -> tuple[UNet2DConditionModel, int]:
    """A fresh UNet with W' = W + scale · up @ down applied for every LoRA pair in the file
    (either layout, see `lora_pairs`).

    Returns the UNet and the number of Linear layers merged.
    """
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    pairs = lora_pairs(lora_file, unet)
    for path, (scale, up, down) in pairs.items():
        unet.get_submodule(path).weight += scale * (up.float() @ down.float())  # a half file merges in float32
    return unet, len(pairs)
