"""Architecture name → adapter class, through the table of families (families.py)."""

from __future__ import annotations

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.families import FAMILIES, get_family


def get_adapter(arch: str) -> type[DiffusionAdapter]:
    """The adapter class of family `arch` (e.g. "sd15", "sdxl", "sd3", "flux").

    Raises ValueError naming `arch` and listing the known architectures.
    """
    return get_family(arch).adapter()


def arch_of_model(path: str) -> str:
    """The architecture of a diffusers model folder or hub id, from its model_index.json's
    `_class_name` (the pipeline class of each family's `pipeline_class_name`, e.g.
    StableDiffusionXLPipeline → "sdxl").

    Raises ValueError naming the path when model_index.json cannot be read or names another pipeline.
    """
    from diffusers import DiffusionPipeline

    try:
        class_name = DiffusionPipeline.load_config(str(path))["_class_name"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"model {path!r}: cannot read its model_index.json ({error})") from None
    for family in FAMILIES.values():
        if family.pipeline_class_name == class_name:
            return family.name
    known = ", ".join(f"{f.pipeline_class_name} ({f.name})" for f in FAMILIES.values())
    raise ValueError(f"model {path!r} is a {class_name}; supported: {known}")


def checked_arch(path: str, arch: str | None) -> str:
    """`arch` when it matches the model at `path`, the model's own when `arch` is None.

    Raises ValueError (naming both) when they differ or the model cannot be read.
    """
    found = arch_of_model(path)
    if arch is not None and arch != found:
        get_family(arch)  # an unknown name gets the list of known ones
        raise ValueError(f"--arch {arch}: the model at {path!r} is {found} ({FAMILIES[found].pipeline_class_name})")
    return found
