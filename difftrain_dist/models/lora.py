"""LoRA injection and LoRA state dicts, through peft.

LoRA is applied to a finished single-device model (torchtitan's "converter" idea): model files
never mention it. Key names are peft's: `<module path>.lora_A.weight` ([r, in_features]) and
`<module path>.lora_B.weight` ([out_features, r]); the adapter is always named "default".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

ADAPTER_NAME = "default"
# Always written to the file header, even at their default values.
_CORE_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
)
# Bookkeeping fields that do not describe the adapter.
_SKIPPED_CONFIG_KEYS = frozenset(
    {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
     "inference_mode", "auto_mapping"}
)
_LORA_PARAM_NAMES = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a plain-string target: the name equals it or ends with "." + it."""
    return module_name == target or module_name.endswith("." + target)


def inject_lora(
    module: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
) -> LoraConfig:
    """Add a trainable LoRA adapter named "default" to `module`, in place.

    Each targeted Linear/Conv layer computes `W x + (alpha / rank) * B A x` (Hu et al. 2021,
    peft `LoraLayer`), with A ~ N(0, 1/rank) and B = 0 (peft `init_lora_weights="gaussian"`),
    so the adapted model starts equal to the base model. Diffusers models go through
    `module.add_adapter` (so `peft_config` is recorded as diffusers expects), other modules
    (text encoders) through `peft.inject_adapter_in_model`, with `peft_config` set the same
    way. Afterwards only LoRA parameters require grad.
    LoRA weights are float32 whatever the base dtype (diffusers' `cast_training_params`, as
    its LoRA training scripts do); peft casts activations to them in the forward pass.

    Args:
        rank: LoRA rank r (> 0).
        alpha: lora_alpha (> 0); the update is scaled by alpha / rank.
        target_modules: module-name suffixes, peft's matching (e.g. "to_q", "to_out.0").
        dropout: dropout probability on the LoRA input, in [0, 1).

    Returns the LoraConfig used. Raises ValueError for a bad rank/alpha/dropout, an empty
    target list, or a target that matches no module (the error names it).
    """
    config = _checked_config(module, rank=rank, alpha=alpha, target_modules=target_modules, dropout=dropout)
    module.requires_grad_(False)
    if isinstance(module, ModelMixin):
        module.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        # transformers' own add_adapter wants a newer peft than diffusers does; peft's injection
        # is what diffusers' load_lora_weights uses for text encoders too.
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        module.peft_config = {ADAPTER_NAME: config}
    for name, param in module.named_parameters():
        param.requires_grad_(_is_lora_param(name))
    cast_training_params(module, dtype=torch.float32)
    return config


def _checked_config(module: torch.nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str],
                    dropout: float) -> LoraConfig:
    """peft's LoraConfig for `inject_lora`, after checking every argument against `module`."""
    if int(rank) != rank or rank <= 0:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if alpha <= 0:
        raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    targets = sorted(set(target_modules))
    if not targets:
        raise ValueError("target_modules: expected at least one module name")
    names = [name for name, _ in module.named_modules()]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in names)]
    if unmatched:
        raise ValueError(f"target_modules: {unmatched} match no module of {type(module).__name__}")
    return LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                      init_lora_weights="gaussian")


def _is_lora_param(name: str) -> bool:
    return any(part in _LORA_PARAM_NAMES for part in name.split("."))


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of `module` (after `inject_lora`), via peft's get_peft_model_state_dict.

    Keys have no adapter name, e.g.
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`.
    Values are float32, CPU, contiguous clones (safe to keep while training continues).
    Raises ValueError if `module` has no LoRA adapter.
    """
    if not getattr(module, "peft_config", None):
        raise ValueError(f"module: {type(module).__name__} has no LoRA adapter; call inject_lora")
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {
        key: value.detach().to(device="cpu", dtype=torch.float32).clone(
            memory_format=torch.contiguous_format
        )
        for key, value in state.items()
    }


def strip_adapter_name(
    state_dict: Mapping[str, torch.Tensor], adapter_name: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """Drop peft's adapter name from LoRA keys: `x.to_q.lora_A.default.weight` → `x.to_q.lora_A.weight`.

    This is the form DeepSpeed's zero_to_fp32 gives for peft models (the module's own
    parameter names). Keys without the adapter name are kept as they are; values are not
    copied. Raises ValueError if two keys map to the same name.
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        kept = [
            part
            for i, part in enumerate(parts)
            if not (part == adapter_name and i > 0 and parts[i - 1] in _LORA_PARAM_NAMES)
        ]
        new_key = ".".join(kept)
        if new_key in stripped:
            raise ValueError(f"state_dict: keys collide after stripping {adapter_name!r}: {new_key}")
        stripped[new_key] = value
    return stripped


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def lora_config_dict(config: LoraConfig) -> dict[str, Any]:
    """JSON-able keyword arguments such that `LoraConfig(**d)` rebuilds `config`.

    Holds r, lora_alpha, target_modules (sorted list), lora_dropout, bias, use_rslora, use_dora,
    init_lora_weights, plus any other field that differs from peft's default. Fields at their
    default are left out on purpose: diffusers passes this dict to `LoraConfig(**d)` when it
    loads a file (`_create_lora_config`), and an older peft rejects keys it does not know.
    This is the dict stored (under the pipeline prefix) in the `lora_adapter_metadata` header.
    """
    values = config.to_dict()
    defaults = LoraConfig().to_dict()
    result: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SKIPPED_CONFIG_KEYS:
            continue
        if key in _CORE_CONFIG_KEYS or value != defaults.get(key):
            result[key] = _jsonable(value)
    return result


class LoraComponents(torch.nn.Module):
    """The pipeline components that carry LoRA, as one module for the training engine.

    Components are registered under their pipeline names, so parameter names read
    `unet.….lora_A.default.weight`, `text_encoder.….lora_B.default.weight`: after
    `strip_adapter_name` these are the keys of a diffusers LoRA file. `forward` runs the
    denoiser; text encoders are called directly (through the adapter's pipeline).
    """

    def __init__(self, denoiser_name: str, components: Mapping[str, torch.nn.Module]) -> None:
        super().__init__()
        if denoiser_name not in components:
            raise ValueError(f"components: no denoiser {denoiser_name!r} among {sorted(components)}")
        self.denoiser_name = denoiser_name
        for name, module in components.items():
            self.add_module(name, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.denoiser_name)(*args, **kwargs)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Every component's `lora_state_dict`, keys prefixed with the component name."""
        return {
            f"{name}.{key}": value
            for name, module in self.named_children()
            for key, value in lora_state_dict(module).items()
        }
