"""LoRA files on disk: the diffusers/peft layout and the kohya layout, plus training metadata.

Both are safetensors files. Input state dicts use peft key names without a prefix or adapter
name (`lora_state_dict` / `strip_adapter_name` output).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

FORMATS = ("diffusers", "kohya")
# Pipeline prefix → kohya key prefix (kohya sd-scripts networks/lora.py; diffusers'
# convert_state_dict_to_kohya maps the same three).
_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# arch → (ss_base_model_version as kohya writes it, modelspec architecture id from kohya's
# library/sai_model_spec.py).
_ARCH_METADATA = {
    "sd15": ("sd_v1", "stable-diffusion-v1"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "sd3": ("sd3", "stable-diffusion-3"),
    "flux": ("flux1", "flux-1-dev"),
}
_RESERVED_HEADER_KEYS = ("format", LORA_ADAPTER_METADATA_KEY)


def save_lora_file(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    prefix: str,
    lora_config: Mapping[str, Any],
    fmt: str = "diffusers",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a LoRA safetensors file atomically (temporary file, then os.replace).

    Args:
        path: destination `.safetensors` file; its folder is created if missing.
        state_dict: peft keys without prefix or adapter name (`...to_q.lora_A.weight`
            [r, in], `...to_q.lora_B.weight` [out, r]); written in their own dtype.
        prefix: pipeline component the keys belong to ("unet", "transformer").
        lora_config: `lora_config_dict(config)`; needs at least "r" and "lora_alpha".
        fmt: "diffusers" — keys `f"{prefix}.{key}"`, header `lora_adapter_metadata` holding
            `{f"{prefix}.{field}": value}` as JSON (indent 2, sorted keys), the packing of
            diffusers' `LoraBaseMixin._save_lora_weights`/`write_lora_layers`, so that
            `pipeline.load_lora_weights(path)` rebuilds the LoraConfig, alpha included.
            "kohya" — keys `lora_unet_<path_with_underscores>.lora_down.weight` (= lora_A),
            `.lora_up.weight` (= lora_B), `.alpha` (float32 scalar = lora_alpha), from
            diffusers' `convert_state_dict_to_kohya` with its alpha (which it sets to the rank)
            replaced by lora_alpha; `ss_network_dim`/`ss_network_alpha` are added if missing.
        metadata: extra string header entries (`ss_*`, `modelspec.*`, see training_metadata).

    Returns `path`. Raises ValueError for an unknown `fmt`, an empty state dict, keys that
    still carry a prefix or adapter name, a non-string metadata value, a reserved metadata key
    ("format", "lora_adapter_metadata"), or a config the kohya format cannot express.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: unknown LoRA file format {fmt!r}; known: {list(FORMATS)}")
    _check_state_dict(state_dict, prefix)
    header = _check_metadata(metadata)
    for key in ("r", "lora_alpha"):
        if key not in lora_config:
            raise ValueError(f"lora_config: missing {key!r}")
    if fmt == "diffusers":
        tensors = {f"{prefix}.{key}": value for key, value in state_dict.items()}
        packed = {f"{prefix}.{key}": value for key, value in lora_config.items()}
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    else:
        tensors = _to_kohya(state_dict, prefix=prefix, lora_config=lora_config)
        header.setdefault("ss_network_dim", str(lora_config["r"]))
        header.setdefault("ss_network_alpha", str(float(lora_config["lora_alpha"])))
        header.setdefault("ss_network_module", "networks.lora")
    header["format"] = "pt"
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    return _atomic_save(Path(path), tensors, header)


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    if not state_dict:
        raise ValueError("state_dict: no LoRA tensors to write")
    for key in state_dict:
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"state_dict: {key!r} is not a LoRA key (expected .lora_A./.lora_B.)")
        if key.startswith(prefix + "."):
            raise ValueError(f"state_dict: {key!r} already carries the prefix {prefix!r}")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(
                f"state_dict: {key!r} carries an adapter name; use strip_adapter_name first"
            )


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    header = dict(metadata or {})
    for key, value in header.items():
        if not isinstance(value, str):
            raise ValueError(f"metadata: {key!r} must be a string, got {type(value).__name__}")
        if key in _RESERVED_HEADER_KEYS:
            raise ValueError(f"metadata: {key!r} is reserved for the file format")
    return header


def _to_kohya(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str, lora_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    if prefix not in _KOHYA_PREFIXES:
        raise ValueError(f"prefix: kohya format supports {sorted(_KOHYA_PREFIXES)}, got {prefix!r}")
    if lora_config.get("rank_pattern") or lora_config.get("alpha_pattern"):
        raise ValueError("lora_config: kohya format has one rank/alpha; rank_pattern unsupported")
    if lora_config.get("use_dora"):
        raise ValueError("lora_config: use_dora is not supported by the kohya writer")
    rank = int(lora_config["r"])
    alpha = float(lora_config["lora_alpha"])
    if lora_config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # kohya scales by alpha / r; rsLoRA by alpha / sqrt(r)
    prefixed = {f"{prefix}.{key}": value for key, value in state_dict.items()}
    converted = convert_state_dict_to_kohya(prefixed)
    kohya_prefix = _KOHYA_PREFIXES[prefix] + "_"
    tensors: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if not key.startswith(kohya_prefix):
            raise ValueError(f"state_dict: converted key {key!r} lacks {kohya_prefix!r}")
        if key.endswith(".alpha"):
            value = torch.tensor(alpha, dtype=torch.float32)
        tensors[key] = value
    return tensors


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; other users' ComfyUI must read it
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file: `(tensors on CPU, header metadata)`.

    The metadata dict is the file's `__metadata__` in full (including "format" and, for
    diffusers files, the `lora_adapter_metadata` JSON string). Raises ValueError naming the
    file when it is missing or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except safetensors.SafetensorError as error:
        raise ValueError(f"LoRA file {str(path)!r}: not a safetensors file ({error})") from error
    return tensors, header


def training_metadata(
    *,
    arch: str,
    base_model: str,
    rank: int,
    alpha: float,
    steps: int,
    resolution: int | tuple[int, int],
    seed: int,
    title: str | None = None,
    date: datetime.datetime | None = None,
    prediction_type: str | None = None,
) -> dict[str, str]:
    """Header entries describing a training run, as kohya sd-scripts and SAI ModelSpec name them.

    Returns strings for `ss_network_dim`, `ss_network_alpha`, `ss_base_model_version`
    (kohya's value, e.g. "sd_v1"), `ss_sd_model_name` (= base_model), `ss_steps`,
    `ss_resolution` ("(W, H)", pixels), `ss_seed`, and ModelSpec 1.0.0
    (https://github.com/Stability-AI/ModelSpec) `modelspec.sai_model_spec`,
    `modelspec.architecture` ("<arch id>/lora", ids from kohya's sai_model_spec.py),
    `modelspec.implementation` ("diffusers"), `modelspec.title` (default
    "<base_model name> LoRA"), `modelspec.resolution` ("WxH"), `modelspec.date` (ISO 8601,
    default now in UTC; pass `date` for reproducible files), and `modelspec.prediction_type`
    when given. Raises ValueError for an unknown arch or a non-positive rank/alpha/resolution.
    """
    if arch not in _ARCH_METADATA:
        raise ValueError(f"arch: unknown architecture {arch!r}; known: {sorted(_ARCH_METADATA)}")
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"rank/alpha: expected positive values, got {rank!r}/{alpha!r}")
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution: expected positive pixels, got {resolution!r}")
    base_version, modelspec_arch = _ARCH_METADATA[arch]
    when = date or datetime.datetime.now(datetime.timezone.utc)
    result = {
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base_version,
        "ss_sd_model_name": base_model,
        "ss_steps": str(int(steps)),
        "ss_resolution": f"({width}, {height})",
        "ss_seed": str(int(seed)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{modelspec_arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or f"{Path(str(base_model)).name} LoRA",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": when.isoformat(),
    }
    if prediction_type is not None:
        result["modelspec.prediction_type"] = prediction_type
    return result
