"""Model adapters (one per architecture), LoRA injection and LoRA file formats.

Nothing here imports Ray or DeepSpeed. The names below are imported on first use, so that
`difftrain_dist.models.families` (the table of families) stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusionAdapter": "base",
    "get_adapter": "registry",
    "init_tiny": "tiny",
    "inject_lora": "lora",
    "lora_config_dict": "lora",
    "lora_state_dict": "lora",
    "strip_adapter_name": "lora",
    "MODELSPEC_PREDICTION_TYPES": "lora_formats",
    "read_lora_file": "lora_formats",
    "save_lora_file": "lora_formats",
    "training_metadata": "lora_formats",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
