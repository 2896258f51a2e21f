"""Stable Diffusion XL adapter: two CLIP text encoders, pooled embeddings and size conditioning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.sd15 import UNET_ATTENTION_TARGETS


class SDXLAdapter(DiffusionAdapter):
    """SDXL base (and tiny models from `init_tiny("sdxl")`): DDPM, epsilon or v-prediction.

    The UNet is conditioned on the concatenated penultimate hidden states of CLIP ViT-L and
    OpenCLIP bigG, on bigG's pooled projection, and on `time_ids` = (original height, width,
    crop top, left, target height, width) in px (Podell et al. 2023, §2.2 "micro-conditioning").
    """

    lora_prefix = "unet"
    default_lora_targets = UNET_ATTENTION_TARGETS
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # kohya sd-scripts sdxl_train_network.py: "lora_te1_…" (ViT-L), "lora_te2_…" (bigG).
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    pipeline_class = StableDiffusionXLPipeline
    component_loaders = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
    }
    sample_guidance_scale = 5.0

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`StableDiffusionXLPipeline.encode_prompt` without classifier-free guidance.

        Returns `{"encoder_hidden_states": [B, 77, D1 + D2], "text_embeds": [B, P]}` on
        `self.device`: penultimate hidden states of both encoders concatenated (2048 for SDXL)
        and text_encoder_2's pooled projection (P = 1280 for SDXL).
        Raises ValueError for an empty list or a non-string caption.
        """
        self.check_captions(captions)
        embeds, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def image_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning from the batch: "original_sizes" ([B, 2] int64, (height,
        width) of each source image in px) and "crops_top_left" ([B, 2] int64, (top, left) of its
        crop), where the reader provides them."""
        return {name: batch[name] for name in ("original_sizes", "crops_top_left") if name in batch}

    def predict(
        self,
        denoiser: Callable[..., Any],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """UNet call with `added_cond_kwargs={"text_embeds", "time_ids"}`: [B, 4, h, w].

        time_ids ([B, 6], the pooled embeddings' dtype) are built as in diffusers'
        train_text_to_image_sdxl.py: original size + crop top-left + target size, where the
        target is the latents' size × 8 px. The sizes come from `conditioning`'s
        "original_sizes" and "crops_top_left" (see `image_conditioning`); without them,
        original = target and crop = (0, 0).
        """
        batch = noisy_latents.shape[0]
        target = torch.tensor(
            [noisy_latents.shape[-2] * self.vae_scale_factor, noisy_latents.shape[-1] * self.vae_scale_factor]
        ).expand(batch, 2)
        original = conditioning.get("original_sizes", target).reshape(batch, 2)
        crops = conditioning.get("crops_top_left", torch.zeros(batch, 2, dtype=torch.long)).reshape(batch, 2)
        pooled = conditioning["text_embeds"]
        time_ids = torch.cat([original.cpu(), crops.cpu(), target], dim=1).to(pooled.device, pooled.dtype)
        return denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
