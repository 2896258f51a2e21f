"""Model adapters (one per architecture), LoRA injection and LoRA file formats.

Nothing here imports Ray or DeepSpeed.
"""

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.lora import (
    inject_lora,
    lora_config_dict,
    lora_state_dict,
    strip_adapter_name,
)
from difftrain_dist.models.lora_formats import (
    MODELSPEC_PREDICTION_TYPES,
    read_lora_file,
    save_lora_file,
    training_metadata,
)
from difftrain_dist.models.registry import ADAPTERS, get_adapter
from difftrain_dist.models.tiny import init_tiny

__all__ = [
    "ADAPTERS",
    "MODELSPEC_PREDICTION_TYPES",
    "DiffusionAdapter",
    "get_adapter",
    "init_tiny",
    "inject_lora",
    "lora_config_dict",
    "lora_state_dict",
    "read_lora_file",
    "save_lora_file",
    "strip_adapter_name",
    "training_metadata",
]
