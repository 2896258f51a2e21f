"""Training objectives: how timesteps are drawn, how latents are noised and what the model predicts.

Two families cover the supported architectures:
- `DDPMObjective` (SD1.5, SDXL): discrete timesteps, diffusers' DDPMScheduler forward process,
  epsilon or v-prediction target.
- `FlowMatchingObjective` (SD3, FLUX): rectified flow, x_t = (1 - σ) x_0 + σ ε, target ε - x_0
  (Esser et al. 2024, "Scaling Rectified Flow Transformers", §2 and eq. 23 for the shift).

Both draw a unit time u in (0, 1) per sample from `TimestepOptions` ("uniform", or
"logit_normal"/"sigmoid": u = sigmoid(N(mean, std)), the SD3 paper's logit-normal sampling, which
kohya sd-scripts calls "sigmoid"), with diffusers' `compute_density_for_timestep_sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

TimestepSampling = Literal["uniform", "logit_normal", "sigmoid"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "sigmoid")
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TimestepOptions:
    """How training draws timesteps; the recipe's `train.timestep_sampling` and friends."""

    sampling: TimestepSampling = "uniform"
    """"uniform" over (0, 1), or "logit_normal"/"sigmoid": sigmoid of N(logit_mean, logit_std)."""
    logit_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal/sigmoid only)."""
    logit_std: float = 1.0
    """Standard deviation before the sigmoid (kohya's `sigmoid_scale`)."""
    flow_shift: float | None = None
    """Flow matching only: fixed shift s, σ' = sσ / (1 + (s - 1)σ). None takes the model
    scheduler's: its `shift`, or the resolution-dependent shift when it has
    `use_dynamic_shifting` (FLUX.1-dev)."""

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: expected one of {TIMESTEP_SAMPLINGS}, got {self.sampling!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std: expected a positive number, got {self.logit_std!r}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ValueError(f"flow_shift: expected a positive number, got {self.flow_shift!r}")


def sample_unit_times(
    options: TimestepOptions, batch_size: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """[batch_size] float32 in (0, 1), drawn with `generator` only (see the module docstring)."""
    scheme = "none" if options.sampling == "uniform" else "logit_normal"
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch_size,
        logit_mean=options.logit_mean,
        logit_std=options.logit_std,
        device=device,
        generator=generator,
    )
    return u.float()


@dataclass
class NoisedBatch:
    """Inputs and target of one training forward pass."""

    noisy_latents: torch.Tensor
    """Same shape as the latents, float32."""
    timesteps: torch.Tensor
    """[B]: int64 DDPM step indices, or float32 flow-matching σ in [0, 1]."""
    target: torch.Tensor
    """What the model must predict, float32, same shape as the latents."""


class DDPMObjective:
    """Denoising diffusion (Ho et al. 2020) with epsilon or v-prediction (Salimans & Ho 2022).

    Timesteps are ⌊u·T⌋ for T = `num_train_timesteps` (uniform u gives diffusers'
    `randint(0, T)`); noising is `DDPMScheduler.add_noise`, the v target `get_velocity`.
    """

    def __init__(self, scheduler: DDPMScheduler, options: TimestepOptions) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: {prediction_type!r} is not supported; "
                f"expected one of {SUPPORTED_PREDICTION_TYPES}"
            )
        self.scheduler = scheduler
        self.options = options

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction": what the denoiser is trained to predict."""
        return self.scheduler.config.prediction_type

    def noise(
        self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, *, image_seq_len: int = 0
    ) -> NoisedBatch:
        """Noise float32 `latents` with `noise` at timesteps drawn from `generator`
        (`image_seq_len` is unused: DDPM schedules do not depend on resolution)."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        u = sample_unit_times(self.options, latents.shape[0], generator, latents.device)
        timesteps = (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target)


class FlowMatchingObjective:
    """Rectified flow: x_t = (1 - σ) x_0 + σ ε with target ε - x_0 (velocity), as in diffusers'
    train_dreambooth_lora_sd3.py / _flux.py and the SD3 paper (no loss weighting)."""

    def __init__(self, scheduler_config: dict, options: TimestepOptions) -> None:
        self.config = dict(scheduler_config)
        self.options = options

    def shift_for(self, image_seq_len: int) -> float:
        """The σ shift s for an image of `image_seq_len` latent tokens.

        The recipe's `flow_shift` when set; else exp(μ) with μ from diffusers' FLUX
        `calculate_shift` (linear in the sequence length between base_shift at
        base_image_seq_len and max_shift at max_image_seq_len) when the scheduler has
        `use_dynamic_shifting`; else the scheduler's `shift` (SD3: 3.0).
        """
        if self.options.flow_shift is not None:
            return float(self.options.flow_shift)
        if self.config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(
                image_seq_len,
                self.config.get("base_image_seq_len", 256),
                self.config.get("max_image_seq_len", 4096),
                self.config.get("base_shift", 0.5),
                self.config.get("max_shift", 1.15),
            )
            return math.exp(mu)
        return float(self.config.get("shift", 1.0))

    def noise(
        self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, *, image_seq_len: int
    ) -> NoisedBatch:
        """Noise float32 `latents` (any shape with batch first) with `noise` at σ drawn from
        `generator` and shifted by `shift_for(image_seq_len)`; `timesteps` holds σ."""
        u = sample_unit_times(self.options, latents.shape[0], generator, latents.device)
        shift = self.shift_for(image_seq_len)
        sigmas = shift * u / (1.0 + (shift - 1.0) * u)
        sigma = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigma) * latents + sigma * noise
        return NoisedBatch(noisy, sigmas, noise - latents)
