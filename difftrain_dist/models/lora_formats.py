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
from pydantic import BaseModel, ConfigDict

from difftrain_dist.models.families import get_family

FORMATS = ("diffusers", "kohya")
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}
"""diffusers' prediction_type → ModelSpec's `modelspec.prediction_type` value."""
_RESERVED_HEADER_KEYS = ("format", LORA_ADAPTER_METADATA_KEY)
# Children of CLIP's text transformer. transformers 5 flattens CLIPTextModel (no `text_model.`
# level) but not CLIPTextModelWithProjection; files always carry `text_model.`, the layout that
# ComfyUI, A1111 and kohya map (diffusers strips it again when the loaded model lacks it).
_CLIP_TEXT_CHILDREN = ("embeddings.", "encoder.layers.", "final_layer_norm.")


def _header_key(name: str) -> str:
    """Python field name → header key: `modelspec_title` → `modelspec.title`, `difftrain_x` →
    `difftrain.x`; kohya's `ss_*` and the rest are spelled as they are."""
    for namespace in ("modelspec", "difftrain"):
        if name.startswith(namespace + "_"):
            return namespace + "." + name.removeprefix(namespace + "_")
    return name


class LoraHeader(BaseModel):
    """The `__metadata__` header of a LoRA safetensors file, every value a string (all that
    safetensors stores). Named fields are the keys this project writes and reads: kohya
    sd-scripts' `ss_*` (train_network.py), SAI ModelSpec 1.0.0's `modelspec.*`
    (https://github.com/Stability-AI/ModelSpec), diffusers' `lora_adapter_metadata` (a JSON
    string, see `save_lora_file`) and safetensors' `format`. Any other key of a file written
    elsewhere is kept as it is. Build from header keys (`LoraHeader.model_validate(metadata)`);
    `metadata()` gives them back."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, alias_generator=_header_key,
                              validate_by_name=True, validate_by_alias=True)
    __pydantic_extra__: dict[str, str]
    format: str | None = None
    lora_adapter_metadata: str | None = None
    ss_network_dim: str | None = None
    ss_network_alpha: str | None = None
    ss_network_module: str | None = None
    ss_base_model_version: str | None = None
    ss_sd_model_name: str | None = None
    ss_steps: str | None = None
    ss_resolution: str | None = None
    ss_seed: str | None = None
    ss_v_parameterization: str | None = None
    modelspec_sai_model_spec: str | None = None
    modelspec_architecture: str | None = None
    modelspec_implementation: str | None = None
    modelspec_title: str | None = None
    modelspec_resolution: str | None = None
    modelspec_date: str | None = None
    modelspec_prediction_type: str | None = None
    difftrain_trained_lora_alpha: str | None = None
    """The lora_alpha the run trained with, before the diffusers writer folded it into lora_B."""
    difftrain_lora_dtype: str | None = None
    """The dtype the tensors were written in ("float32", "float16", "bfloat16")."""
    difftrain_ema_decay: str | None = None
    """Set when the file holds the moving average of the trained weights, with its decay."""

    def metadata(self) -> dict[str, str]:
        """The header as safetensors stores it: key → string, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True)


def read_lora_header(path: Path) -> LoraHeader:
    """The header of the LoRA safetensors file at `path` (the tensors are not read).

    Raises:
        ValueError: naming the file when it is missing or not a safetensors file.
    """
    return _read(Path(path), tensors=False)[1]


def _read(path: Path, *, tensors: bool) -> tuple[dict[str, torch.Tensor], LoraHeader]:
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            header = LoraHeader.model_validate(handle.metadata() or {})
            weights = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"LoRA file {str(path)!r}: not a safetensors file ({error})") from None
    return weights, header


def save_lora_file(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    lora_configs: Mapping[str, Mapping[str, Any]],
    fmt: str = "diffusers",
    kohya_prefixes: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a LoRA safetensors file atomically (temporary file, then os.replace).

    Args:
        path: destination `.safetensors` file; its folder is created if missing.
        state_dict: peft keys under their pipeline component, without adapter name
            (`unet.…to_q.lora_A.weight` [r, in], `text_encoder.…q_proj.lora_B.weight` [out, r]).
        lora_configs: component ("unet", "transformer", "text_encoder", …) →
            `lora_config_dict(config)`, one per component present in `state_dict`; each
            needs at least "r" and "lora_alpha".
        fmt: "diffusers" — keys as given, with the LoRA scale folded into the up weights:
            `lora_B` is written as (lora_alpha / r) · lora_B (lora_alpha / √r for rsLoRA) and
            the header's `lora_adapter_metadata` (`{f"{component}.{field}": value}` as JSON,
            indent 2, sorted keys, the packing of diffusers' `LoraBaseMixin._save_lora_weights`)
            says lora_alpha = r, use_rslora false. The file then loads at the trained strength
            in loaders that read alpha from the header (diffusers' `load_lora_weights`) and in
            those that never do and apply scale 1 (ComfyUI's `comfy/lora.py`, A1111's
            `network_lora.py`). `ss_network_alpha` says r, the value the file holds; the trained
            alpha is kept as `difftrain.trained_lora_alpha`.
            "kohya" — keys `<kohya prefix>_<path_with_underscores>.lora_down.weight`
            (= lora_A), `.lora_up.weight` (= lora_B), `.alpha` (float32 scalar = lora_alpha),
            from diffusers' `convert_state_dict_to_kohya` with its alpha (which it sets to the
            rank) replaced by lora_alpha; `ss_network_dim`/`ss_network_alpha` added if missing.
        kohya_prefixes: component → kohya key prefix ("unet" → "lora_unet", "text_encoder" →
            "lora_te" for SD1.x or "lora_te1" for SDXL; the adapter's `kohya_prefixes`).
            Required for "kohya".
        metadata: extra string header entries (`ss_*`, `modelspec.*`, see training_metadata).
        dtype: the dtype the LoRA tensors are written in (cast after the scale is folded in);
            recorded in the header as `difftrain.lora_dtype`. None: each tensor's own. kohya's
            `.alpha` scalars stay float32.

    Returns `path`. Raises ValueError for an unknown `fmt`, an empty state dict, keys without
    a component in `lora_configs` or still carrying an adapter name, a non-string metadata
    value, a reserved metadata key ("format", "lora_adapter_metadata"), or a file the kohya
    layout cannot express (a component without kohya prefix, rank/alpha patterns, DoRA).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: unknown LoRA file format {fmt!r}; known: {list(FORMATS)}")
    _check_state_dict(state_dict, lora_configs)
    header = _check_metadata(metadata)
    state_dict = canonical_text_encoder_keys(state_dict)
    if fmt == "diffusers":
        tensors, header = _diffusers_layout(state_dict, lora_configs, header)
    else:
        tensors = _to_kohya(state_dict, lora_configs=lora_configs, kohya_prefixes=kohya_prefixes or {})
        first = next(iter(lora_configs.values()))
        header = {"ss_network_dim": str(first["r"]), "ss_network_alpha": str(float(first["lora_alpha"])),
                  "ss_network_module": "networks.lora", **header}
    if dtype is not None:
        header["difftrain.lora_dtype"] = str(dtype).removeprefix("torch.")
    return _atomic_save(Path(path), _cast(tensors, dtype), LoraHeader.model_validate({**header, "format": "pt"}))


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached contiguous tensors in `dtype` (None: their own), kohya's `.alpha` scalars kept."""
    return {key: (value if dtype is None or key.endswith(".alpha") else value.to(dtype)).detach().contiguous()
            for key, value in tensors.items()}


def _diffusers_layout(
    state_dict: Mapping[str, torch.Tensor], lora_configs: Mapping[str, Mapping[str, Any]], header: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with the LoRA scale folded into lora_B, and the header saying so (see `save_lora_file`)."""
    tensors, folded = _fold_lora_scale(state_dict, lora_configs)
    packed = {f"{component}.{key}": value for component, config in folded.items() for key, value in config.items()}
    trained_alpha = header.get("ss_network_alpha", str(float(next(iter(lora_configs.values()))["lora_alpha"])))
    return tensors, {**header, LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
                     "difftrain.trained_lora_alpha": trained_alpha,
                     "ss_network_alpha": str(float(folded[next(iter(folded))]["lora_alpha"]))}


def canonical_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `text_model.` back into CLIP text-encoder keys that lack it (a flattened
    `CLIPTextModel` under transformers 5): `text_encoder.encoder.layers.0…` →
    `text_encoder.text_model.encoder.layers.0…`. Other keys are unchanged; values not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component.startswith("text_encoder") and rest.startswith(_CLIP_TEXT_CHILDREN):
            key = f"{component}.text_model.{rest}"
        out[key] = value
    return out


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"unet.x.lora_A.weight": t}` → `{"unet": {"x.lora_A.weight": t}}` (values not copied)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    return parts


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], lora_configs: Mapping[str, Any]) -> None:
    for component, config in lora_configs.items():
        for key in ("r", "lora_alpha"):
            if key not in config:
                raise ValueError(f"lora_configs[{component!r}]: missing {key!r}")
    if not state_dict:
        raise ValueError("state_dict: no LoRA tensors to write")
    for key in state_dict:
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"state_dict: {key!r} is not a LoRA key (expected .lora_A./.lora_B.)")
        if key.partition(".")[0] not in lora_configs:
            raise ValueError(
                f"state_dict: {key!r} does not start with a component of lora_configs "
                f"({sorted(lora_configs)})"
            )
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


def lora_scale(config: Mapping[str, Any]) -> float:
    """The factor peft applies to B @ A: lora_alpha / r, or lora_alpha / √r with use_rslora
    (peft `LoraLayer.update_layer`). Raises ValueError for per-module rank or alpha patterns,
    which one factor cannot express."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("lora_config: rank_pattern/alpha_pattern are not supported by the LoRA file writers")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _fold_lora_scale(
    state_dict: Mapping[str, torch.Tensor], lora_configs: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """`lora_B` times its component's `lora_scale`, and configs saying lora_alpha = r (scale 1)."""
    scales = {component: lora_scale(config) for component, config in lora_configs.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        scale = scales[key.partition(".")[0]]
        if key.endswith(".lora_B.weight") and scale != 1.0:
            value = (value.double() * scale).to(value.dtype)
        tensors[key] = value
    folded = {
        component: {**config, "lora_alpha": int(config["r"]), "use_rslora": False}
        for component, config in lora_configs.items()
    }
    return tensors, folded


def _to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    lora_configs: Mapping[str, Mapping[str, Any]],
    kohya_prefixes: Mapping[str, str],
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for component, weights in split_components(state_dict).items():
        if component not in kohya_prefixes:
            known = sorted(kohya_prefixes) or "none for this architecture"
            raise ValueError(
                f"kohya format: no kohya key layout for component {component!r} (has: {known}); "
                "use the diffusers format"
            )
        config = lora_configs[component]
        if config.get("use_dora"):
            raise ValueError("lora_config: use_dora is not supported by the kohya writer")
        # kohya's loaders scale by .alpha / r: store the alpha that gives peft's scale.
        alpha = lora_scale(config) * int(config["r"])
        # convert_state_dict_to_kohya knows the "unet." prefix: convert under it, then rename.
        converted = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in weights.items()})
        for key, value in converted.items():
            if not key.startswith("lora_unet_"):
                raise ValueError(f"state_dict: converted key {key!r} lacks 'lora_unet_'")
            if key.endswith(".alpha"):
                value = torch.tensor(alpha, dtype=torch.float32)
            tensors[kohya_prefixes[component] + key.removeprefix("lora_unet")] = value
    return tensors


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], header: LoraHeader) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header.metadata())
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
    diffusers files, the `lora_adapter_metadata` JSON string; see `LoraHeader`). Raises
    ValueError naming the file when it is missing or not a safetensors file.
    """
    tensors, header = _read(Path(path), tensors=True)
    return tensors, header.metadata()


def check_lora_fits(path: Path, arch: str) -> None:
    """Raise ValueError when the LoRA file's `modelspec.architecture` header names another
    architecture than `arch` (files without the header are not judged)."""
    family = get_family(arch).modelspec_architecture.removesuffix("-dev")
    declared = read_lora_header(path).modelspec_architecture
    if declared and not declared.startswith(family):
        raise ValueError(f"LoRA file {str(path)!r} was trained for {declared.removesuffix('/lora')}, "
                         f"not for this {arch} model")


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
    (the family's `kohya_base_version`, e.g. "sd_v1"), `ss_sd_model_name` (= base_model), `ss_steps`,
    `ss_resolution` ("(W, H)", pixels), `ss_seed`, and ModelSpec 1.0.0
    (https://github.com/Stability-AI/ModelSpec) `modelspec.sai_model_spec`,
    `modelspec.architecture` ("<the family's modelspec_architecture>/lora"),
    `modelspec.implementation` ("diffusers"), `modelspec.title` (default
    "<base_model name> LoRA"), `modelspec.resolution` ("WxH"), `modelspec.date` (ISO 8601,
    default now in UTC; pass `date` for reproducible files), and `modelspec.prediction_type`
    when given. Raises ValueError for an unknown arch or a non-positive rank/alpha/resolution.
    """
    family = get_family(arch)
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"rank/alpha: expected positive values, got {rank!r}/{alpha!r}")
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution: expected positive pixels, got {resolution!r}")
    when = date or datetime.datetime.now(datetime.timezone.utc)
    return LoraHeader(
        ss_network_dim=str(int(rank)),
        ss_network_alpha=str(float(alpha)),
        ss_base_model_version=family.kohya_base_version,
        ss_sd_model_name=base_model,
        ss_steps=str(int(steps)),
        ss_resolution=f"({width}, {height})",
        ss_seed=str(int(seed)),
        modelspec_sai_model_spec="1.0.0",
        modelspec_architecture=f"{family.modelspec_architecture}/lora",
        modelspec_implementation="diffusers",
        modelspec_title=title or f"{Path(str(base_model)).name} LoRA",
        modelspec_resolution=f"{width}x{height}",
        modelspec_date=when.isoformat(),
        modelspec_prediction_type=prediction_type,
        ss_v_parameterization=None if prediction_type is None else str(prediction_type == "v"),  # kohya's name
    ).metadata()


def lora_prediction_type(path: Path) -> str | None:
    """The diffusers prediction_type ("epsilon", "v_prediction") a LoRA file's header records
    (`modelspec.prediction_type`), None when it records none. Raises ValueError for a file that
    is not safetensors."""
    declared = read_lora_header(path).modelspec_prediction_type
    by_modelspec = {value: key for key, value in MODELSPEC_PREDICTION_TYPES.items()}
    return by_modelspec.get(declared)
