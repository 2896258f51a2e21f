"""The per-architecture adapter interface the trainer programs against.

An adapter owns the frozen parts of a diffusion pipeline (text encoders, VAE, noise schedule)
and exposes the denoiser (UNet or transformer) that LoRA is injected into. It is single-device
and knows nothing of Ray or DeepSpeed: the trainer may wrap `adapter.denoiser` in an engine and
pass that engine back to `training_loss` as the callable to run.

Subclasses declare their pipeline's components (`component_loaders`), implement
`encode_prompts` and `predict`, and pick an objective (DDPM or flow matching, objectives.py);
loading, VAE latents, the loss and the in-memory pipeline for sampling are shared here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import PreTrainedTokenizerBase

from difftrain_dist.models.families import Family, family_of_adapter
from difftrain_dist.models.loading import check_model_path, freeze, has_folder, load_component, load_noise_scheduler
from difftrain_dist.models.objectives import (
    DDPMObjective,
    FlowMatchingObjective,
    TimestepOptions,
)
from difftrain_dist.quiet import quiet_diffusers_progress

quiet_diffusers_progress()

TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP attention projections: the text-encoder LoRA targets of diffusers' LoRA scripts."""


class DiffusionAdapter(abc.ABC):
    """One diffusion architecture: loading, conditioning, latents and the training loss.

    Subclasses set the class variables and implement `encode_prompts` and `predict`.
    """

    family: ClassVar[Family]
    """This architecture's record in the table of families (families.py): the record whose
    `adapter_path` names the class, set when the class is defined."""
    arch: ClassVar[str]
    """The family's name, e.g. "sd15" (set from `family`)."""
    lora_prefix: ClassVar[str]
    """Pipeline component name of the denoiser, the key prefix in diffusers LoRA files
    ("unet" or "transformer")."""
    default_lora_targets: ClassVar[tuple[str, ...]]
    """peft `target_modules` of the denoiser used when the recipe names none."""
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    """Text-encoder components that can take a LoRA (`lora.train_text_encoder`)."""
    kohya_prefixes: ClassVar[dict[str, str]] = {}
    """Component name → key prefix in kohya-format files; empty: no kohya format."""
    lora_file_format: ClassVar[str]
    """The layout of the LoRA files training writes (the family's `lora_file_format`)."""
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    """The diffusers pipeline class that loads this architecture and its LoRA files."""
    component_loaders: ClassVar[dict[str, Any]]
    """Component folder → class whose `from_pretrained` loads it (scheduler excluded)."""
    optional_components: ClassVar[tuple[str, ...]] = ()
    """Components a run may leave out (`load_optional=False`), e.g. SD3's T5 encoder."""
    sample_guidance_scale: ClassVar[float] = 7.5
    """Default guidance scale when rendering samples."""
    vae_scale_factor: ClassVar[int] = 8
    """Pixels per latent pixel along each side."""
    pixel_multiple: ClassVar[int]
    """Image sides must be multiples of this many pixels (the family's `pixel_multiple`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        path = f"{cls.__module__}:{cls.__qualname__}"
        cls.family = family_of_adapter(path) or getattr(cls, "family", None)
        if cls.family is None:
            raise TypeError(f"{path}: no record of the table of families (families.py) names this adapter")
        cls.arch = cls.family.name
        cls.lora_file_format = cls.family.lora_file_format
        cls.pixel_multiple = cls.family.pixel_multiple
        if cls.pipeline_class.__name__ != cls.family.pipeline_class_name:
            raise TypeError(f"{cls.__name__}: pipeline_class {cls.pipeline_class.__name__} is not the "
                            f"family's {cls.family.pipeline_class_name}")

    denoiser: torch.nn.Module
    """The UNet/transformer: LoRA goes in here and the trainer wraps it."""
    vae: AutoencoderKL
    device: torch.device
    """Device of the frozen components and of the tensors `encode_*` return."""

    def __init__(
        self,
        *,
        path: str,
        components: Mapping[str, Any],
        objective: DDPMObjective | FlowMatchingObjective,
        device: torch.device,
    ) -> None:
        self.path = str(path)
        self.components = dict(components)
        self.denoiser = self.components[self.lora_prefix]
        self.vae = self.components["vae"]
        self.encoding_vae = self.vae
        """The VAE that encodes training images: `vae`, or a float32 copy (see `from_pretrained`)."""
        self.objective = objective
        self.device = torch.device(device)
        self._pipeline: DiffusionPipeline | None = None
        self.guidance_scale = 1.0

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
        prediction_type: str | None = None,
        timesteps: TimestepOptions | None = None,
        load_optional: bool = True,
        guidance_scale: float = 1.0,
    ) -> DiffusionAdapter:
        """Load every component in `component_loaders`, plus the scheduler config, from `path`.

        `path` is a local diffusers folder or a hub id; each component goes through its class's
        `from_pretrained(path, subfolder=name)`. Models are moved to `device` in `dtype`, set to
        eval mode and frozen (requires_grad False); LoRA is added later with `inject_lora`.
        In float16, a VAE whose config sets `force_upcast` (SDXL's) is loaded a second time in
        float32 as `encoding_vae`, which encodes the training images (`vae` stays float16 for the
        pipeline, which upcasts it to decode).
        `optional_components` are skipped when `load_optional` is False or their folder is
        missing. `prediction_type` overrides the scheduler's (DDPM architectures only);
        `timesteps` sets timestep sampling and shift (default: uniform, the model's shift).
        `guidance_scale` is the guidance-embedding input of guidance-distilled models
        (FLUX.1-dev) during training; other models ignore it.

        Raises ValueError naming `path` when the folder or a component is missing, for an
        unsupported prediction_type, or a prediction_type given to a flow-matching model.
        """
        path = str(path)
        required = [n for n in cls.component_loaders if n not in cls.optional_components]
        check_model_path(path, (*required, "scheduler"))
        device = torch.device(device)
        timesteps = timesteps or TimestepOptions()
        objective = cls.load_objective(path, prediction_type, timesteps)
        components: dict[str, Any] = {}
        for name, loader in cls.component_loaders.items():
            if name in cls.optional_components and (not load_optional or not has_folder(path, name)):
                components[name] = None
                continue
            if isinstance(loader, type) and issubclass(loader, PreTrainedTokenizerBase):
                components[name] = load_component(loader, path, name)
                continue
            components[name] = load_component(loader, path, name, dtype=dtype)
            freeze(components[name], dtype=dtype, device=device)
        adapter = cls(path=path, components=components, objective=objective, device=device)
        adapter.guidance_scale = float(guidance_scale)
        if dtype == torch.float16 and components["vae"].config.get("force_upcast", False):
            # A VAE that declares force_upcast (SDXL's) gives NaN latents in float16; diffusers'
            # pipelines upcast it to float32 for decoding, and the images are encoded in float32 too.
            adapter.encoding_vae = freeze(load_component(AutoencoderKL, path, "vae", dtype=torch.float32),
                                          dtype=torch.float32, device=device)
        return adapter

    @classmethod
    def load_objective(
        cls, path: str, prediction_type: str | None, timesteps: TimestepOptions
    ) -> DDPMObjective | FlowMatchingObjective:
        """The training objective from `path`/scheduler (DDPM unless overridden)."""
        return DDPMObjective(load_noise_scheduler(path, prediction_type), timesteps)

    @property
    def noise_scheduler(self) -> DDPMScheduler:
        """The training DDPMScheduler (DDPM architectures only)."""
        return self.objective.scheduler

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The loaded text encoders that can take a LoRA, by component name."""
        return {n: self.components[n] for n in self.text_encoder_names if self.components.get(n) is not None}

    def enable_gradient_checkpointing(self, *, text_encoders: bool = False) -> None:
        """Recompute activations in backward: the denoiser's blocks (diffusers'
        `enable_gradient_checkpointing`) and, when `text_encoders`, the text encoders' layers
        (transformers' `gradient_checkpointing_enable`). Results are unchanged; memory drops."""
        self.denoiser.enable_gradient_checkpointing()
        if text_encoders:
            for encoder in self.text_encoders.values():
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline over this adapter's in-memory components (LoRA included).

        Built once with `pipeline_class.from_pretrained(path, **components)`, which loads only
        what is not passed: the inference scheduler (the model's own, e.g. PNDM or
        FlowMatchEuler; with the trained `prediction_type` where that differs from the model's).
        Encoding prompts and rendering samples both go through it.
        """
        if self._pipeline is None:
            pipe = self.pipeline_class.from_pretrained(self.path, **self.components, **self.pipeline_extra_kwargs())
            trained = getattr(self.objective, "prediction_type", None)
            if trained is not None and pipe.scheduler.config.get("prediction_type") != trained:
                # Trained with another parameterisation than the model's (model.prediction_type):
                # sample with the same scheduler class, reading the prediction as trained.
                pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=trained)
            pipe.set_progress_bar_config(disable=True)
            self._pipeline = pipe
        return self._pipeline

    def pipeline_extra_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for building the pipeline (e.g. no safety checker)."""
        return {}

    @abc.abstractmethod
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments for `predict`, one row per caption (see subclasses).

        Runs with autograd as the caller has it: under `torch.no_grad()` for a frozen text
        encoder, with grad when a text-encoder LoRA is trained.
        """

    @abc.abstractmethod
    def predict(
        self,
        denoiser: Callable[..., Any],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The denoiser's prediction, [B, C, h, w] like `noisy_latents` (see subclasses);
        `conditioning` is what `batch_conditioning` returns."""

    def image_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Conditioning `predict` takes from the images rather than the captions (SDXL's sizes
        and crops); none by default."""
        return {}

    def batch_conditioning(self, batch: dict[str, Any], *, precomputed: bool = False) -> dict[str, torch.Tensor]:
        """Everything `predict` is conditioned on for a reader batch (see `ShardStream`): the
        text conditioning (the batch's precomputed "conditioning" moved to `self.device` when
        `precomputed` and present, else `encode_prompts(batch["captions"])`) and
        `image_conditioning(batch)`."""
        if precomputed and "conditioning" in batch:
            text = {name: value.to(self.device, non_blocking=True) for name, value in batch["conditioning"].items()}
        else:
            text = self.encode_prompts(batch["captions"])
        return {**text, **self.image_conditioning(batch)}

    def check_captions(self, captions: list[str]) -> None:
        """Raise ValueError unless `captions` is a non-empty list of strings."""
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions: expected a non-empty list of strings")

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled VAE latents of `pixel_values`: (z - shift_factor) × scaling_factor.

        Args:
            pixel_values: [B, 3, H, W] float in [-1, 1], H and W multiples of the VAE's scale.
            generator: when given, z is a sample of the VAE posterior drawn with it (as
                diffusers' training scripts do); when None, the posterior mean.

        Returns [B, C, H/8, W/8] float32 on `self.device` (C: 4 for SD1.5/SDXL, 16 for
        SD3/FLUX). Raises ValueError for a wrong shape.
        """
        return self.latents_from_parameters(self.latent_parameters(pixel_values), generator=generator)

    @torch.no_grad()
    def latent_parameters(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance concatenated on channels).

        What `shards build --precompute` stores: [B, 2C, H/8, W/8] float32 on `self.device`.
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
        vae = self.encoding_vae
        pixels = pixel_values.to(device=self.device, dtype=vae.dtype)
        return vae.encode(pixels).latent_dist.parameters.float()

    @torch.no_grad()
    def latents_from_parameters(
        self, parameters: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents from stored posterior parameters: a sample drawn with `generator`
        (diffusers' `DiagonalGaussianDistribution.sample`), or the mean when it is None.
        Same result as `encode_images` on the pixels the parameters came from."""
        posterior = DiagonalGaussianDistribution(parameters.to(self.device, self.encoding_vae.dtype))
        latents = posterior.mean if generator is None else posterior.sample(generator=generator)
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((latents.float() - shift) * self.vae.config.scaling_factor).float()

    def training_loss(
        self,
        denoiser: Callable[..., Any],
        latents: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Training loss for one micro-batch.

        Args:
            denoiser: `self.denoiser` or a wrapper around it (e.g. a DeepSpeed engine) that
                `predict` calls.
            latents: [B, C, h, w] scaled latents (any float dtype) on the training device.
            conditioning: `batch_conditioning` (or `encode_prompts`) for the same B rows.
            generator: torch.Generator on `latents.device`; noise ([B, C, h, w], N(0, 1)) and
                timesteps come from it only, so the same generator state gives the same loss.

        Returns a scalar float32 tensor: the mean squared error, computed in float32, between
        the prediction and the objective's target (epsilon / v for DDPM, ε - x₀ for flow
        matching, see objectives.py). Noisy latents and float conditioning are cast to the
        denoiser's dtype before the call.

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
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        image_seq_len = latents.shape[-2] * latents.shape[-1] // 4
        noised = self.objective.noise(latents, noise, generator, image_seq_len=image_seq_len)
        model_dtype = _module_dtype(self.denoiser)
        model_kwargs = {
            name: value.to(model_dtype) if value.is_floating_point() else value
            for name, value in conditioning.items()
        }
        prediction = self.predict(
            denoiser,
            noised.noisy_latents.to(model_dtype),
            noised.timesteps,
            model_kwargs,
        )
        return F.mse_loss(prediction.float(), noised.target.float(), reduction="mean")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of the first floating-point parameter (the frozen base weights come first)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
