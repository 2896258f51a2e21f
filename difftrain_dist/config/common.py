"""What every part of the recipe schema shares: its base model, its error and the path-check switch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names every offending field."""


def checks_paths(info: ValidationInfo) -> bool:
    """False when validating with context {"check_paths": False}: paths that live on a cluster
    (`cluster k8s`, `submit --no-path-check`) are taken as given, not looked up here."""
    return (info.context or {}).get("check_paths", True)


class Section(BaseModel):
    """A recipe section: unknown keys refused, fields checked on assignment, documented by their docstrings."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )
