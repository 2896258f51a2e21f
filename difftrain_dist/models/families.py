"""The table of model families: every name and trait of an architecture that code outside its
adapter needs, in one place.

Importing this module is cheap (no torch, no diffusers), so the recipe schema and the CLI's
`--help` read it too. Each family's adapter class (models/sd15.py, sdxl.py, sd3.py, flux.py) takes
its name and file traits from its record here; `get_adapter` imports the adapter on demand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from difftrain_dist.models.base import DiffusionAdapter


@dataclass(frozen=True)
class Family:
    """One architecture family and what the rest of the package needs to know of it."""

    name: str
    """Recipe name (`model.arch`), e.g. "sdxl"."""
    pipeline_class_name: str
    """The diffusers pipeline class in a model folder's model_index.json `_class_name`."""
    objective: Literal["ddpm", "flow_matching"]
    """DDPM (epsilon / v-prediction: `model.prediction_type` applies) or rectified flow
    (`train.flow_shift` applies)."""
    text_encoder_lora: bool
    """Whether `lora.train_text_encoder` is supported (CLIP text encoders)."""
    optional_t5: bool
    """Whether the T5 encoder may be left out (`model.use_t5: false`)."""
    lora_file_format: Literal["kohya", "diffusers"]
    """The layout training writes: one that diffusers, ComfyUI and A1111/Forge all map in full at
    the trained strength for this family (README, "LoRA files")."""
    kohya_base_version: str
    """`ss_base_model_version` as kohya sd-scripts writes it."""
    modelspec_architecture: str
    """`modelspec.architecture` id (kohya's library/sai_model_spec.py), without "/lora"."""
    tiny_variants: dict[str, str]
    """Name `init_tiny` builds → "module:function" of its builder (FLUX: "flux" is FLUX.1-dev,
    "flux-schnell" FLUX.1-schnell)."""
    adapter_path: str
    """"module:Class" of the adapter."""
    pixel_multiple: int = 8
    """Image sides must be multiples of this many pixels (16 where the latents are cut in 2×2
    patches: SD3 and FLUX)."""
    aitoolkit_archs: tuple[str, ...] = ()
    """ai-toolkit's `model.arch` names of the family (toolkit/config_modules.py ModelConfig)."""
    aitoolkit_flag: str | None = None
    """ai-toolkit's legacy `model.is_*` flag that selects it (None: the family with no flag set)."""

    def adapter(self) -> type[DiffusionAdapter]:
        """The adapter class (imports torch and diffusers)."""
        return _resolve(self.adapter_path)


def _resolve(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# lora_file_format: ComfyUI and A1111 map SD1.x/SDXL UNet LoRA keys only in the kohya layout; SD3
# has no kohya layout diffusers converts; A1111's FLUX loader maps only the peft layout (ComfyUI and
# Forge map both).
_TINY = "difftrain_dist.models.tiny"
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd15", "StableDiffusionPipeline", "ddpm",
               text_encoder_lora=True, optional_t5=False, lora_file_format="kohya",
               kohya_base_version="sd_v1", modelspec_architecture="stable-diffusion-v1",
               tiny_variants={"sd15": f"{_TINY}.sd15:build_sd15"},
               adapter_path="difftrain_dist.models.sd15:SD15Adapter", aitoolkit_archs=("sd1", "sd15")),
        Family("sdxl", "StableDiffusionXLPipeline", "ddpm",
               text_encoder_lora=True, optional_t5=False, lora_file_format="kohya",
               kohya_base_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
               tiny_variants={"sdxl": f"{_TINY}.sdxl:build_sdxl"},
               adapter_path="difftrain_dist.models.sdxl:SDXLAdapter", aitoolkit_archs=("sdxl",),
               aitoolkit_flag="is_xl"),
        Family("sd3", "StableDiffusion3Pipeline", "flow_matching",
               text_encoder_lora=False, optional_t5=True, lora_file_format="diffusers",
               kohya_base_version="sd3", modelspec_architecture="stable-diffusion-3",
               tiny_variants={"sd3": f"{_TINY}.sd3:build_sd3"},
               adapter_path="difftrain_dist.models.sd3:SD3Adapter", pixel_multiple=16, aitoolkit_archs=("sd3",),
               aitoolkit_flag="is_v3"),
        Family("flux", "FluxPipeline", "flow_matching",
               text_encoder_lora=False, optional_t5=False, lora_file_format="diffusers",
               kohya_base_version="flux1", modelspec_architecture="flux-1-dev",
               tiny_variants={"flux": f"{_TINY}.flux:build_flux_dev",
                              "flux-schnell": f"{_TINY}.flux:build_flux_schnell"},
               adapter_path="difftrain_dist.models.flux:FluxAdapter", pixel_multiple=16,
               aitoolkit_archs=("flux", "flex1"),
               aitoolkit_flag="is_flux"),
    )
}
"""Family name → record, in the order the CLI lists them."""

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
TINY_VARIANTS: tuple[str, ...] = tuple(v for family in FAMILIES.values() for v in family.tiny_variants)


def get_family(name: str) -> Family:
    """The record of family `name`. Raises ValueError naming it and listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"arch: unknown architecture {name!r}; known: {sorted(FAMILIES)}") from None


def family_of_adapter(adapter_path: str) -> Family | None:
    """The record whose `adapter_path` is `adapter_path` ("module:Class"), None when no record names it."""
    return next((f for f in FAMILIES.values() if f.adapter_path == adapter_path), None)


def names_where(**traits: object) -> list[str]:
    """Family names whose record has every given trait value, e.g. `names_where(objective="ddpm")`."""
    return [f.name for f in FAMILIES.values() if all(getattr(f, k) == v for k, v in traits.items())]


def tiny_builder(variant: str) -> Callable[[int, Path], Any]:
    """The builder of tiny variant `variant` (`(seed, work_dir) -> DiffusionPipeline`).

    Raises ValueError naming `variant` and listing the known ones."""
    for family in FAMILIES.values():
        if variant in family.tiny_variants:
            return _resolve(family.tiny_variants[variant])
    raise ValueError(f"arch: unknown architecture {variant!r}; known: {sorted(TINY_VARIANTS)}")
