"""Reading a recipe: YAML file → `--set` overrides → validated `Recipe`, errors listing every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .recipe import Recipe, RecipeError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides to a raw recipe dict (values parsed as YAML scalars).

    Raises:
        RecipeError: an override without `=` or whose path crosses a non-mapping value.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text else None
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            found = e.get("input")
            message = e["msg"].removeprefix("Value error, ")
            quoted = isinstance(found, (str, Path)) and str(found) and str(found) in message
            shown = "" if isinstance(found, dict) or quoted else f" (found {found!r})"
            lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>", *, check_paths: bool = True) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe`, resolving paths to absolute ones.

    `check_paths=False` validates everything but the file system: model and shard paths are
    taken as given (they live on a cluster), not looked up or resolved.

    Raises:
        RecipeError: listing every invalid, missing or unknown field with its dotted path.
    """
    try:
        recipe = Recipe.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None
    return _absolute_paths(recipe) if check_paths else recipe


def load_recipe(
    path: Path,
    overrides: list[str] | None = None,
    *,
    replace: dict[str, Any] | None = None,
    check_paths: bool = True,
) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides and validate it.

    Relative paths in the recipe are taken relative to the current directory. `replace` sets
    dotted fields to values as given (no YAML parsing), after the overrides. `check_paths`: see
    `recipe_from_dict`.

    Raises:
        RecipeError: the file is missing, is not a YAML mapping, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections (run, model, data, train, ...)")
    raw = apply_overrides(raw, overrides or [])
    for key, value in (replace or {}).items():
        *sections, field = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = value
    return recipe_from_dict(raw, source=str(path), check_paths=check_paths)


def _absolute_paths(recipe: Recipe) -> Recipe:
    recipe.run.output_dir = recipe.run.output_dir.expanduser().resolve()
    recipe.run.storage_path = recipe.run.storage_path.expanduser().resolve()
    recipe.data.shards = recipe.data.shards.expanduser().resolve()
    local = Path(recipe.model.path).expanduser()
    if local.is_dir():
        recipe.model.path = str(local.resolve())
    return recipe
