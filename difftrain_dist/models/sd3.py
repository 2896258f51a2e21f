"""Stable Diffusion 3 adapter: MMDiT transformer, flow matching, CLIP-L + CLIP-G (+ optional T5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.loading import load_flow_objective
from difftrain_dist.models.objectives import FlowMatchingObjective, TimestepOptions

MMDIT_ATTENTION_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
"""Image- and text-stream attention projections of the joint blocks (diffusers' SD3/FLUX
DreamBooth LoRA scripts' default)."""


class SD3Adapter(DiffusionAdapter):
    """SD3 / SD3.5 (and tiny models from `init_tiny("sd3")`): rectified flow with shift.

    The T5 encoder (text_encoder_3) is optional: without it the pipeline pads the sequence with
    zeros, as SD3 was trained to accept (Esser et al. 2024, §5.3.3).
    """

    lora_prefix = "transformer"
    default_lora_targets = MMDIT_ATTENTION_TARGETS
    # No kohya layout: diffusers has no converter for kohya-style SD3 files, so none is written.
    kohya_prefixes = {}
    pipeline_class = StableDiffusion3Pipeline
    component_loaders = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "tokenizer_3": T5TokenizerFast,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": SD3Transformer2DModel,
    }
    optional_components = ("tokenizer_3", "text_encoder_3")
    sample_guidance_scale = 7.0

    @classmethod
    def load_objective(
        cls, path: str, prediction_type: str | None, timesteps: TimestepOptions
    ) -> FlowMatchingObjective:
        return load_flow_objective(path, prediction_type, timesteps)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`StableDiffusion3Pipeline.encode_prompt` without classifier-free guidance.

        Returns `{"encoder_hidden_states": [B, 77 + L, J], "pooled_projections": [B, P]}` on
        `self.device`: the two CLIP penultimate states (padded to J = joint_attention_dim,
        4096 for SD3) followed by L = 256 T5 states (zeros without T5), and both CLIPs' pooled
        projections concatenated (P = 2048). Raises ValueError for an empty list or a
        non-string caption.
        """
        self.check_captions(captions)
        embeds, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(
        self,
        denoiser: Callable[..., Any],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Transformer velocity at σ = `timesteps` ([B] in [0, 1]; the model takes σ × 1000,
        as the pipeline's FlowMatchEulerDiscreteScheduler timesteps): [B, 16, h, w]."""
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps * 1000.0,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]
