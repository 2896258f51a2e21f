"""The typed recipe: one source of truth for every setting of a training run.

A recipe is a YAML file whose sections map onto :class:`Recipe` (`recipe.py`); `load.py` reads
the file, applies ``--set section.field=value`` overrides and validates it. Unknown keys are
errors that name the key and where it is.
"""

from .common import RecipeError
from .data import DataSection, DatasetFolder
from .load import apply_overrides, load_recipe, recipe_from_dict
from .recipe import (
    ARCHS,
    CheckpointSection,
    DistributedSection,
    LoraSection,
    ModelSection,
    Recipe,
    RunSection,
    SampleSection,
    TrainSection,
    changed_fields,
)

__all__ = [
    "ARCHS", "CheckpointSection", "DataSection", "DatasetFolder", "DistributedSection", "LoraSection", "ModelSection",
    "Recipe", "RecipeError", "RunSection", "SampleSection", "TrainSection", "apply_overrides",
    "changed_fields", "load_recipe", "recipe_from_dict",
]
