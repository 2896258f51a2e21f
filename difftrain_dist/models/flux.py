"""FLUX.1 adapter (dev and schnell): packed latents, rotary position ids, guidance embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.loading import load_flow_objective
from difftrain_dist.models.objectives import FlowMatchingObjective, TimestepOptions
from difftrain_dist.models.sd3 import MMDIT_ATTENTION_TARGETS


class FluxAdapter(DiffusionAdapter):
    """FLUX.1-dev / -schnell (and tiny models from `init_tiny("flux")`): rectified flow.

    Latents [B, 16, h, w] are packed into 2×2 patches, [B, h/2 · w/2, 64], with image position
    ids (0, row, column) and all-zero text position ids (`FluxPipeline._pack_latents`,
    `_prepare_latent_image_ids`). Models with `guidance_embeds` (dev) get the recipe's
    `train.guidance_scale` as their guidance input; schnell has none. FLUX.1-dev's scheduler
    shifts σ by resolution (`use_dynamic_shifting`), schnell's does not.
    """

    lora_prefix = "transformer"
    default_lora_targets = MMDIT_ATTENTION_TARGETS
    # "lora_transformer_<diffusers path>" (OneTrainer's layout): ComfyUI maps it for FLUX, and
    # diffusers' FluxLoraLoaderMixin converts it (_convert_kohya_flux_lora_to_diffusers).
    kohya_prefixes = {"transformer": "lora_transformer"}
    pipeline_class = FluxPipeline
    component_loaders = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5TokenizerFast,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": FluxTransformer2DModel,
    }
    sample_guidance_scale = 3.5

    @classmethod
    def load_objective(
        cls, path: str, prediction_type: str | None, timesteps: TimestepOptions
    ) -> FlowMatchingObjective:
        return load_flow_objective(path, prediction_type, timesteps)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`FluxPipeline.encode_prompt` (CLIP pooled output, T5 hidden states).

        Returns `{"encoder_hidden_states": [B, 512, J], "pooled_projections": [B, P]}` on
        `self.device` (J = 4096, P = 768 for FLUX.1). Raises ValueError for an empty list or a
        non-string caption.
        """
        self.check_captions(captions)
        embeds, pooled, _ = self.pipeline().encode_prompt(
            prompt=captions, prompt_2=None, device=self.device, num_images_per_prompt=1
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(
        self,
        denoiser: Callable[..., Any],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Transformer velocity at σ = `timesteps` ([B] in [0, 1], what FluxPipeline passes as
        `timestep / 1000`), unpacked back to [B, 16, h, w] (h, w even)."""
        batch, channels, height, width = noisy_latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"latents: FLUX packs 2x2 patches; h and w must be even, got {height}x{width}")
        dtype, device = noisy_latents.dtype, noisy_latents.device
        packed = FluxPipeline._pack_latents(noisy_latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.guidance_scale), device=device, dtype=torch.float32)
        velocity = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype),
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(
            velocity, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )
