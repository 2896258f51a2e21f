"""Loading a pipeline's parts from a diffusers folder or hub id: path checks, components, frozen
modules and the noise schedule / flow-matching objective its scheduler config describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from difftrain_dist.models.families import names_where
from difftrain_dist.models.objectives import (
    SUPPORTED_PREDICTION_TYPES,
    FlowMatchingObjective,
    TimestepOptions,
)


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


def has_folder(path: str, name: str) -> bool:
    """True when `path` is a hub id (left to from_pretrained) or a local folder with `name`/."""
    local = Path(path).expanduser()
    return not local.exists() or (local / name).is_dir()


def load_flow_objective(
    path: str, prediction_type: str | None, timesteps: TimestepOptions
) -> FlowMatchingObjective:
    """Flow-matching objective with the shift settings of `path`/scheduler's config
    (a FlowMatchEulerDiscreteScheduler's: shift, use_dynamic_shifting, base/max shift).

    Raises ValueError when a prediction_type is given (flow models predict velocity) or the
    scheduler config cannot be read.
    """
    if prediction_type is not None:
        ddpm = ", ".join(names_where(objective="ddpm"))
        raise ValueError(f"prediction_type: {prediction_type!r} applies to DDPM models ({ddpm}); "
                         "flow-matching models always predict the velocity")
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    except OSError as error:
        raise ValueError(f"model path {path!r}: cannot load scheduler/: {error}") from error
    return FlowMatchingObjective(config, timesteps)


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
