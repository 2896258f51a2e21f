"""Stable Diffusion 1.x adapter: CLIP text encoder, KL VAE (scale 8), UNet2DConditionModel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from difftrain_dist.models.base import DiffusionAdapter

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections of diffusers' UNet2DConditionModel (self- and cross-attention)."""


class SD15Adapter(DiffusionAdapter):
    """Stable Diffusion 1.x (and tiny models of the same layout from `init_tiny("sd15")`).

    Epsilon or v-prediction (the scheduler's, or the recipe's `model.prediction_type`).
    """

    lora_prefix = "unet"
    default_lora_targets = UNET_ATTENTION_TARGETS
    text_encoder_names = ("text_encoder",)
    # kohya sd-scripts networks/lora.py: SD1.x text encoder keys are "lora_te_…".
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    pipeline_class = StableDiffusionPipeline
    component_loaders = {
        "tokenizer": CLIPTokenizer,
        "text_encoder": CLIPTextModel,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
    }
    sample_guidance_scale = 7.5

    def pipeline_extra_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP last hidden states for `captions`, the UNet's cross-attention input.

        Captions are padded/truncated to `tokenizer.model_max_length` (77 for SD1.5) as in
        `StableDiffusionPipeline.encode_prompt` (no clip-skip). Returns
        `{"encoder_hidden_states": [B, 77, D]}` in the text encoder's dtype on `self.device`,
        D = text_encoder.config.hidden_size (768 for SD1.5). Raises ValueError for an empty
        list or a non-string caption.
        """
        self.check_captions(captions)
        tokenizer = self.components["tokenizer"]
        input_ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden_states = self.components["text_encoder"](input_ids)[0]
        return {"encoder_hidden_states": hidden_states}

    def predict(
        self,
        denoiser: Callable[..., Any],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """`denoiser(noisy_latents, timesteps, encoder_hidden_states=…).sample`: [B, 4, h, w]."""
        return denoiser(noisy_latents, timesteps, **conditioning).sample
