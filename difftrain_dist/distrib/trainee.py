"""Set-up of what a rank trains: the model through its family adapter, LoRA injected, the trained
components wrapped in a DeepSpeed engine."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.ema import LoraEMA
from difftrain_dist.distrib.engine import DTYPES, build_engine
from difftrain_dist.models import get_adapter, inject_lora, lora_config_dict
from difftrain_dist.models.base import TEXT_ENCODER_LORA_TARGETS, DiffusionAdapter
from difftrain_dist.models.lora import LoraComponents
from difftrain_dist.models.objectives import TimestepOptions


@dataclass
class Trainee:
    """Everything a rank trains with."""

    adapter: Any
    engine: Any
    lora_configs: dict[str, Any]
    """Pipeline component ("unet", "transformer", "text_encoder", …) → its peft LoraConfig."""
    device: torch.device
    noise_generator: torch.Generator
    ema: LoraEMA | None = None
    """The moving average of the LoRA weights (`train.ema_decay`), None without one."""
    precomputed_conditioning: bool = False
    """Use a batch's "conditioning" (precomputed from the stored captions) instead of encoding its
    captions: only valid when the recipe's caption transforms leave captions as stored and the
    text encoders are frozen."""

    @property
    def trains_text_encoder(self) -> bool:
        return len(self.lora_configs) > 1

    def lora_config_dicts(self) -> dict[str, dict[str, Any]]:
        """`lora_config_dict` of each component's config (what LoRA file headers hold)."""
        return {name: lora_config_dict(config) for name, config in self.lora_configs.items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the same on every rank so LoRA initialisation matches)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_trainee(
    recipe: Recipe, global_rank: int, *, adapter: DiffusionAdapter | None = None
) -> Trainee:
    """Load the model through its adapter, inject LoRA and wrap the trained components in DeepSpeed.

    `adapter`: an adapter already built in memory (the GPU benchmark's full-size random models);
    None loads `recipe.model.path` with `from_pretrained`.
    """
    use_gpu = recipe.distributed.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    if use_gpu:
        # FLUX's transformer backward hit illegal memory accesses in cuDNN's SDPA kernel at 1024 px
        # (see DESIGN.md); the flash and memory-efficient kernels are used instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    seed_everything(recipe.run.seed)
    train, lora = recipe.train, recipe.lora
    if adapter is None:
        adapter = get_adapter(recipe.model.arch).from_pretrained(
            recipe.model.path,
            dtype=DTYPES[recipe.model.dtype],
            device=device,
            prediction_type=recipe.model.prediction_type,
            timesteps=TimestepOptions(train.timestep_sampling, train.logit_mean, train.logit_std, train.flow_shift),
            load_optional=recipe.model.use_t5,
            guidance_scale=train.guidance_scale,
        )
    shape = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout}
    targets = lora.target_modules or list(adapter.default_lora_targets)
    lora_configs = {adapter.lora_prefix: inject_lora(adapter.denoiser, target_modules=targets, **shape)}
    if lora.train_text_encoder:
        text_targets = lora.text_encoder_target_modules or list(TEXT_ENCODER_LORA_TARGETS)
        for name, encoder in adapter.text_encoders.items():
            lora_configs[name] = inject_lora(encoder, target_modules=text_targets, **shape)
    if train.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(text_encoders=lora.train_text_encoder)
    trained = LoraComponents(adapter.lora_prefix, {name: adapter.components[name] for name in lora_configs})
    trained.train()
    engine, _, _ = build_engine(trained, recipe)
    noise_generator = torch.Generator(device).manual_seed(recipe.run.seed * 1_000_003 + global_rank)
    ema = None if train.ema_decay is None else LoraEMA(engine.module, train.ema_decay)
    return Trainee(adapter, engine, lora_configs, device, noise_generator, ema=ema,
                   precomputed_conditioning=precomputed_text_unusable(recipe) is None)


def precomputed_text_unusable(recipe: Recipe) -> str | None:
    """Why precomputed text embeddings (of the captions as stored, with every text encoder of the
    model) cannot stand in for encoding this recipe's captions; None when they can."""
    data = recipe.data
    if data.caption_dropout or data.shuffle_captions or data.trigger_word is not None:
        return "data.caption_dropout, shuffle_captions or trigger_word change the captions"
    if recipe.lora.train_text_encoder:
        return "lora.train_text_encoder trains the text encoders"
    if not recipe.model.use_t5:
        return "model.use_t5 is false, and they hold T5's states"
    return None
