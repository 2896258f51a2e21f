"""Consolidation: DeepSpeed checkpoint shards → one safetensors LoRA file diffusers, ComfyUI and A1111 load."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from difftrain_dist import models
from difftrain_dist.distrib.checkpoint import LORA_FILE, CheckpointInfo, deepspeed_tag, inspect_checkpoint
from difftrain_dist.distrib.ema import EMA_FILE
from difftrain_dist.distrib.engine import DTYPES
from difftrain_dist.models.families import get_family

FORMATS = ("diffusers", "kohya")


def lora_file_metadata(recipe: dict[str, Any], lora_config: dict[str, Any], step: int) -> dict[str, str]:
    """Training metadata (`ss_*`, `modelspec.*`) for the header of a LoRA file (`lora_config`:
    the denoiser's). A recipe's `model.prediction_type` is recorded as ModelSpec's
    `modelspec.prediction_type` ("epsilon" or "v"), its `train.ema_decay` as
    `difftrain.ema_decay` (the file then holds the moving average)."""
    prediction_type = recipe["model"].get("prediction_type")
    ema_decay = recipe.get("train", {}).get("ema_decay")
    return {**models.training_metadata(
        prediction_type=models.MODELSPEC_PREDICTION_TYPES[prediction_type] if prediction_type else None,
        arch=recipe["model"]["arch"],
        base_model=recipe["model"]["path"],
        rank=lora_config["r"],
        alpha=lora_config["lora_alpha"],
        steps=step,
        resolution=recipe["data"]["resolution"],
        seed=recipe["run"]["seed"],
        title=recipe["run"]["name"],
    ), **({} if ema_decay is None else {"difftrain.ema_decay": repr(float(ema_decay))})}


def write_checkpoint_lora(trainee, recipe, step: int, local_dir: Path, *, write: bool) -> None:
    """Write `lora.safetensors` from the in-memory adapter weights (their moving average when the
    recipe keeps one, which also goes to `ema.safetensors`), in the architecture's
    `lora_file_format` (the layout every client of that architecture loads) and
    `checkpoint.lora_dtype`.

    Every rank must call it: under ZeRO-3 the LoRA parameters are gathered collectively first.
    Only the rank with `write=True` writes the file.
    """
    module = trainee.engine.module
    with gathered_lora(module, recipe.distributed.zero_stage):
        if not write:
            return
        if trainee.ema is not None:
            trainee.ema.save(local_dir / EMA_FILE)
        configs = trainee.lora_config_dicts()
        adapter = trainee.adapter
        with trainee.ema.swapped_in() if trainee.ema is not None else contextlib.nullcontext():
            models.save_lora_file(
                local_dir / LORA_FILE,
                module.lora_state_dict(),
                lora_configs=configs,
                fmt=adapter.lora_file_format,
                kohya_prefixes=adapter.kohya_prefixes,
                metadata=lora_file_metadata(recipe.model_dump(mode="json"), configs[adapter.lora_prefix], step),
                dtype=DTYPES[recipe.checkpoint.lora_dtype],
            )


def gathered_lora(module: torch.nn.Module, zero_stage: int):
    """Context in which every rank sees the full LoRA weights of `module` (a collective under
    ZeRO-3, where each rank holds a partition; nothing to do below stage 3)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _consolidated_lora_weights(ckpt_dir: Path, step: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA weights in float32: its moving average when it holds one, else the
    trained weights from the DeepSpeed files."""
    tag = deepspeed_tag(step)
    if (ckpt_dir / EMA_FILE).is_file():
        weights = safetensors.torch.load_file(str(ckpt_dir / EMA_FILE))
    elif zero_stage == 0:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        weights = states["module"]
    else:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, exclude_frozen_parameters=True
        )
    lora = {k: v.float().contiguous() for k, v in weights.items() if ".lora_" in k}
    return models.strip_adapter_name(lora)


def export_checkpoint(ckpt_dir: Path, out_path: Path, fmt: str | None = None, dtype: str | None = None) -> Path:
    """Validate a checkpoint and write its LoRA file (see `export_valid_checkpoint`).

    Args:
        ckpt_dir: a `checkpoint_{step:09d}` folder.
        out_path: the `.safetensors` file to write (parent folders are created).
        fmt: "diffusers" (peft keys under the pipeline prefix, scale folded into lora_B) or
            "kohya" (`lora_unet_*` with `.alpha`); None: the architecture's `lora_file_format`.
        dtype: "float32", "float16" or "bfloat16"; None: the run's `checkpoint.lora_dtype`.

    Raises:
        ValueError: unknown format or dtype, an output path inside the checkpoint or naming a
            folder, or the checkpoint is invalid (the reason is given).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"--output: {out_path} is a folder; give the .safetensors file to write")
    if Path(ckpt_dir).resolve() in out_path.resolve().parents:
        raise ValueError(f"--output: {out_path} is inside the checkpoint; writing there would change it")
    info = inspect_checkpoint(Path(ckpt_dir))
    if not info.valid:
        raise ValueError(f"checkpoint {ckpt_dir} is not valid: {info.reason}")
    return export_valid_checkpoint(info, out_path, fmt, dtype)


def export_valid_checkpoint(info: CheckpointInfo, out_path: Path, fmt: str | None = None, dtype: str | None = None,
                            *, from_shards: bool = False) -> Path:
    """Write the LoRA file of a checkpoint `inspect_checkpoint` found valid.

    In the architecture's own format and the run's `checkpoint.lora_dtype` (`fmt`, `dtype` None
    or equal to them) this is the checkpoint's `lora.safetensors`, copied (written at save time
    from the in-memory weights; its sha256 was checked with the checkpoint). Otherwise the
    float32 weights are read from the checkpoint's `ema.safetensors` when it has one, else
    consolidated from the DeepSpeed shards (`zero_to_fp32`), as for a checkpoint without a LoRA
    file, or when `from_shards`.

    Raises:
        ValueError: kohya asked for an architecture without a kohya layout, or no LoRA weights.
    """
    manifest = info.manifests[0]
    recipe = manifest.recipe
    family = get_family(recipe["model"]["arch"])
    fmt = fmt or family.lora_file_format
    out_path = Path(out_path)
    saved = info.path / LORA_FILE
    saved_dtype = recipe.get("checkpoint", {}).get("lora_dtype", "float32")
    dtype = dtype or saved_dtype
    if fmt == family.lora_file_format and dtype == saved_dtype and saved.is_file() and not from_shards:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(out_path.name + ".partial")
        shutil.copyfile(saved, partial)
        partial.replace(out_path)
        return out_path
    adapter = models.get_adapter(family.name)  # a conversion: the family's key layout (imports diffusers)
    if fmt == "kohya" and not adapter.kohya_prefixes:
        raise ValueError(f"--format kohya: not available for {adapter.arch}: diffusers has no loader for "
                         f"kohya-style {adapter.arch} files; use --format diffusers (ComfyUI loads it as well)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weights = _consolidated_lora_weights(info.path, info.step, manifest.zero_stage)
    if not weights:
        raise ValueError(f"checkpoint {info.path} holds no LoRA weights")
    configs = manifest.lora_configs
    return models.save_lora_file(
        out_path,
        weights,
        lora_configs=configs,
        fmt=fmt,
        kohya_prefixes=adapter.kohya_prefixes,
        metadata=lora_file_metadata(recipe, configs[adapter.lora_prefix], info.step),
        dtype=DTYPES[dtype],
    )
