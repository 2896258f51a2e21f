"""The per-architecture adapter interface the trainer programs against.

An adapter owns the frozen parts of a diffusion pipeline (text encoders, VAE, noise scheduler)
and exposes the denoiser (UNet or transformer) that LoRA is injected into. It is single-device
and knows nothing of Ray or DeepSpeed: the trainer may wrap `adapter.denoiser` in an engine and
pass that engine back to `training_loss` as the callable to run.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiffusionAdapter(abc.ABC):
    """One diffusion architecture: loading, conditioning, latents and the training loss.

    Subclasses set the class variables and implement `from_pretrained`, `encode_prompts` and
    `encode_images`. The default `training_loss` is the DDPM noise-prediction loss (epsilon or
    v-prediction); flow-matching architectures override it.
    """

    arch: ClassVar[str]
    """Registry name, e.g. "sd15"."""
    lora_prefix: ClassVar[str]
    """Key prefix of the denoiser in diffusers LoRA files ("unet" or "transformer")."""
    default_lora_targets: ClassVar[tuple[str, ...]]
    """peft `target_modules` used when the recipe names none."""
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    """The diffusers pipeline class that loads this architecture and its LoRA files."""

    denoiser: torch.nn.Module
    """The UNet/transformer: LoRA goes in here and the trainer wraps it."""
    noise_scheduler: DDPMScheduler
    """Training noise scheduler, loaded from the model's `scheduler/` folder."""
    device: torch.device
    """Device of the frozen components and of the tensors `encode_*` return."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
        prediction_type: str | None = None,
    ) -> DiffusionAdapter:
        """Load every component from a diffusers folder or hub id (see subclasses)."""

    @abc.abstractmethod
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments for the denoiser, one row per caption."""

    @abc.abstractmethod
    def encode_images(
        self, pixel_values: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled VAE latents for a batch of images in [-1, 1]."""

    @abc.abstractmethod
    def latent_parameters(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters of a batch of images in [-1, 1] (what precompute stores)."""

    @abc.abstractmethod
    def latents_from_parameters(
        self, parameters: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents from `latent_parameters` output; equals `encode_images` on the pixels."""

    def training_loss(
        self,
        denoiser: Callable[..., Any],
        latents: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """DDPM training loss for one micro-batch.

        Args:
            denoiser: `self.denoiser` or a wrapper around it (e.g. a DeepSpeed engine); it is
                called as `denoiser(noisy_latents, timesteps, **conditioning).sample`.
            latents: [B, C, h, w] scaled latents (any float dtype) on the training device.
            conditioning: output of `encode_prompts` for the same B rows.
            generator: torch.Generator on `latents.device`; noise ([B, C, h, w], N(0, 1)) and
                timesteps ([B] int64, uniform over 0..num_train_timesteps-1) come from it only,
                so the same generator state gives the same loss.

        Returns a scalar float32 tensor: mean squared error, computed in float32, between the
        prediction and the target: the noise for "epsilon", `noise_scheduler.get_velocity`
        for "v_prediction" (Salimans & Ho 2022, as in diffusers' train_text_to_image.py).
        Noisy latents come from `noise_scheduler.add_noise` (DDPM forward process, Ho et al. 2020)
        and are cast to the denoiser's dtype before the call.

        Raises ValueError if the generator is on another device than `latents`, or if
        `latents` is not 4-D.
        """
        if latents.ndim != 4:
            raise ValueError(f"latents: expected [B, C, h, w], got shape {tuple(latents.shape)}")
        if generator.device.type != latents.device.type:
            raise ValueError(
                f"generator: on {generator.device}, but latents are on {latents.device}; "
                "create the generator on the latents' device"
            )
        latents = latents.float()
        batch_size = latents.shape[0]
        noise = torch.randn(
            latents.shape, generator=generator, device=latents.device, dtype=torch.float32
        )
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0, num_train_timesteps, (batch_size,), generator=generator, device=latents.device
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self._training_target(latents, noise, timesteps)
        model_dtype = _module_dtype(self.denoiser)
        model_kwargs = {
            name: value.to(model_dtype) if value.is_floating_point() else value
            for name, value in conditioning.items()
        }
        prediction = denoiser(noisy_latents.to(model_dtype), timesteps, **model_kwargs).sample
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def _training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"prediction_type: {prediction_type!r} is not supported; "
            f"expected one of {SUPPORTED_PREDICTION_TYPES}"
        )


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of the first floating-point parameter (the frozen base weights come first)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def check_model_path(path: str, subfolders: tuple[str, ...]) -> None:
    """Fail early, naming the path, when a local model folder is missing or incomplete.

    A `path` that does not exist locally and looks like a hub id ("org/name") is left for
    `from_pretrained` to resolve. Raises ValueError for a missing local folder or a missing
    component subfolder.
    """
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"model path {path!r}: expected a diffusers folder, found a file")
        missing = [name for name in subfolders if not (local / name).is_dir()]
        if missing:
            raise ValueError(
                f"model path {path!r}: missing component folder(s) {missing}; "
                f"a diffusers model folder has {list(subfolders)}"
            )
        return
    parts = str(path).split("/")
    looks_like_hub_id = len(parts) == 2 and all(parts) and not str(path).startswith((".", "~"))
    if not looks_like_hub_id:
        raise ValueError(f"model path {path!r}: no such folder (and not a hub id 'org/name')")


def load_component(loader: Any, path: str, subfolder: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path, subfolder=subfolder, **kwargs)`, errors naming the path.

    Raises ValueError (chained to the original OSError) when the component
    cannot be found or read, e.g. a hub id while offline.
    """
    try:
        return loader.from_pretrained(path, subfolder=subfolder, **kwargs)
    except OSError as error:
        raise ValueError(f"model path {path!r}: cannot load {subfolder}/: {error}") from error


def freeze(module: torch.nn.Module, *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Move `module` to `device`/`dtype`, put it in eval mode and turn off requires_grad.

    Diffusers models should already be loaded in `dtype` (`dtype=`): diffusers warns when
    `.to(dtype)` casts a model that has modules to keep in float32.
    """
    module.to(device=device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def load_noise_scheduler(path: str, prediction_type: str | None) -> DDPMScheduler:
    """DDPMScheduler from `path`/scheduler, optionally overriding `prediction_type`.

    The config may be any diffusers scheduler's (SD1.5 ships PNDM's); DDPMScheduler reads the
    shared beta-schedule fields. Raises ValueError for a prediction_type other than
    "epsilon" or "v_prediction".
    """
    overrides: dict[str, Any] = {}
    if prediction_type is not None:
        if prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: expected one of {SUPPORTED_PREDICTION_TYPES}, "
                f"got {prediction_type!r}"
            )
        overrides["prediction_type"] = prediction_type
    scheduler = load_component(DDPMScheduler, path, "scheduler", **overrides)
    if scheduler.config.prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type: {path!r}/scheduler has {scheduler.config.prediction_type!r}; "
            f"expected one of {SUPPORTED_PREDICTION_TYPES}"
        )
    return scheduler
