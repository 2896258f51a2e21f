"""Architecture name → adapter class. New architectures add one line here."""

from __future__ import annotations

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.flux import FluxAdapter
from difftrain_dist.models.sd3 import SD3Adapter
from difftrain_dist.models.sd15 import SD15Adapter
from difftrain_dist.models.sdxl import SDXLAdapter

ADAPTERS: dict[str, type[DiffusionAdapter]] = {
    adapter.arch: adapter for adapter in (SD15Adapter, SDXLAdapter, SD3Adapter, FluxAdapter)
}


def get_adapter(arch: str) -> type[DiffusionAdapter]:
    """The adapter class registered under `arch` (e.g. "sd15", "sdxl", "sd3", "flux").

    Raises ValueError naming `arch` and listing the known architectures.
    """
    try:
        return ADAPTERS[arch]
    except KeyError:
        raise ValueError(
            f"arch: unknown architecture {arch!r}; known: {sorted(ADAPTERS)}"
        ) from None


def arch_of_model(path: str) -> str:
    """The architecture of a diffusers model folder or hub id, from its model_index.json's
    `_class_name` (the pipeline class: StableDiffusionPipeline → "sd15", StableDiffusionXLPipeline →
    "sdxl", StableDiffusion3Pipeline → "sd3", FluxPipeline → "flux").

    Raises ValueError naming the path when model_index.json cannot be read or names another pipeline.
    """
    from diffusers import DiffusionPipeline

    try:
        class_name = DiffusionPipeline.load_config(str(path))["_class_name"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"model {path!r}: cannot read its model_index.json ({error})") from None
    for arch, adapter in ADAPTERS.items():
        if adapter.pipeline_class.__name__ == class_name:
            return arch
    known = ", ".join(f"{a.pipeline_class.__name__} ({arch})" for arch, a in ADAPTERS.items())
    raise ValueError(f"model {path!r} is a {class_name}; supported: {known}")


def checked_arch(path: str, arch: str | None) -> str:
    """`arch` when it matches the model at `path`, the model's own when `arch` is None.

    Raises ValueError (naming both) when they differ or the model cannot be read.
    """
    found = arch_of_model(path)
    if arch is not None and arch != found:
        get_adapter(arch)  # an unknown name gets the list of known ones
        raise ValueError(f"--arch {arch}: the model at {path!r} is {found} ({ADAPTERS[found].pipeline_class.__name__})")
    return found
