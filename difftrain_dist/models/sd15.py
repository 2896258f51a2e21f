"""Stable Diffusion 1.x adapter: CLIP text encoder, KL VAE (scale 8), UNet2DConditionModel."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTokenizer

from difftrain_dist.models.base import (
    DiffusionAdapter,
    check_model_path,
    freeze,
    load_component,
    load_noise_scheduler,
)

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class SD15Adapter(DiffusionAdapter):
    """Stable Diffusion 1.x (and tiny models of the same layout from `init_tiny("sd15")`)."""

    arch = "sd15"
    lora_prefix = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class = StableDiffusionPipeline

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        device: torch.device,
    ) -> None:
        self.denoiser = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
        prediction_type: str | None = None,
    ) -> SD15Adapter:
        """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ from `path`.

        `path` is a local diffusers folder or a hub id. UNet, VAE and text encoder are moved to
        `device` in `dtype`, set to eval mode and frozen (requires_grad False); LoRA is added
        later with `inject_lora(adapter.denoiser, ...)`. The noise scheduler is a
        DDPMScheduler built from scheduler/ (SD1.5 ships a PNDM config; the beta schedule is
        shared), with `prediction_type` overriding the file's when given.

        Raises ValueError naming `path` when the folder or a component is missing, and for an
        unsupported prediction_type.
        """
        path = str(path)
        check_model_path(path, _SUBFOLDERS)
        device = torch.device(device)
        noise_scheduler = load_noise_scheduler(path, prediction_type)
        tokenizer = load_component(CLIPTokenizer, path, "tokenizer")
        text_encoder = load_component(CLIPTextModel, path, "text_encoder")
        vae = load_component(AutoencoderKL, path, "vae", dtype=dtype)
        unet = load_component(UNet2DConditionModel, path, "unet", dtype=dtype)
        for module in (text_encoder, vae, unet):
            freeze(module, dtype=dtype, device=device)
        return cls(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            noise_scheduler=noise_scheduler,
            device=device,
        )

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP last hidden states for `captions`, as the UNet's cross-attention input.

        Captions are padded/truncated to `tokenizer.model_max_length` (77 for SD1.5) as in
        `StableDiffusionPipeline.encode_prompt` (no clip-skip). Returns
        `{"encoder_hidden_states": [B, 77, D]}` in the text encoder's dtype on `self.device`,
        D = text_encoder.config.hidden_size (768 for SD1.5). Raises ValueError for an empty
        list or a non-string caption.
        """
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions: expected a non-empty list of strings")
        input_ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden_states = self.text_encoder(input_ids)[0]
        return {"encoder_hidden_states": hidden_states}

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """VAE latents of `pixel_values` times `vae.config.scaling_factor` (0.18215 for SD1.5).

        Args:
            pixel_values: [B, 3, H, W] float in [-1, 1], H and W multiples of 8.
            generator: when given, latents are a sample of the VAE posterior drawn with it
                (as diffusers' train_text_to_image.py does); when None, the posterior mean.

        Returns [B, 4, H/8, W/8] float32 on `self.device`.
        Raises ValueError for a wrong shape.
        """
        return self.latents_from_parameters(self.latent_parameters(pixel_values), generator=generator)

    @torch.no_grad()
    def latent_parameters(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance concatenated on channels).

        What `shards build --precompute` stores: [B, 8, H/8, W/8] float32 on `self.device`.
        Raises ValueError for a wrong shape.
        """
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values: expected [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[2] % factor or pixel_values.shape[3] % factor:
            raise ValueError(
                f"pixel_values: H and W must be multiples of {factor}, "
                f"got {tuple(pixel_values.shape[2:])}"
            )
        pixels = pixel_values.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.parameters.float()

    @torch.no_grad()
    def latents_from_parameters(
        self, parameters: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents from stored posterior parameters: a sample drawn with `generator`
        (diffusers' `DiagonalGaussianDistribution.sample`), or the mean when it is None.
        Same result as `encode_images` on the pixels the parameters came from."""
        posterior = DiagonalGaussianDistribution(parameters.to(self.device, self.vae.dtype))
        latents = posterior.mean if generator is None else posterior.sample(generator=generator)
        return (latents * self.vae.config.scaling_factor).float()
