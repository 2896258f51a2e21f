"""Reading a recipe: YAML file → `--set` overrides → validated `Recipe`, errors listing every field."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .aitoolkit import convert_job, is_aitoolkit_job
from .common import RecipeError
from .recipe import Recipe

log = logging.getLogger("difftrain_dist")


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
        node[parts[-1]] = yaml.load(text, Loader=_Loader) if text else None
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            found = e.get("input")
            message = e["msg"].removeprefix("Value error, ")
            quoted = isinstance(found, (str, Path)) and str(found) and str(found) in message
            shown = "" if isinstance(found, dict) or quoted else f" (found {found!r})"
            lines.append(f"  {where}: {message}{shown}" if where else f"  {message}{shown}")
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` as a float as YAML 1.2 does (PyYAML's YAML 1.1
    resolver wants `1.0e-4` and makes `1e-4` a string; ai-toolkit patches its loader the same way)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path` (a native recipe or an ai-toolkit job).

    Raises:
        RecipeError: the file is missing, not valid YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections (run, model, data, train, ...)")
    return raw


def load_recipe(
    path: Path,
    overrides: list[str] | None = None,
    *,
    replace: dict[str, Any] | None = None,
    check_paths: bool = True,
) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides and validate it. An ai-toolkit job file is
    read as the native recipe it means (aitoolkit.py; each key it accepts without a meaning here
    is logged as a one-line note) before the overrides.

    Relative paths in the recipe are taken relative to the current directory. `replace` sets
    dotted fields to values as given (no YAML parsing), after the overrides. `check_paths`: see
    `recipe_from_dict`.

    Raises:
        RecipeError: the file is missing, is not a YAML mapping, or fails validation.
    """
    raw = read_recipe_file(path)
    if is_aitoolkit_job(raw):
        conversion = convert_job(raw, str(path))
        for note in conversion.notes:
            log.warning("note: %s", note)
        raw = conversion.recipe
    raw = apply_overrides(raw, overrides or [])
    for key, value in (replace or {}).items():
        *sections, field = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise RecipeError(f"invalid recipe {path}:\n  {section}: expected a mapping of fields, found {node!r}")
        node[field] = value
    return recipe_from_dict(raw, source=str(path), check_paths=check_paths)


def _absolute_paths(recipe: Recipe) -> Recipe:
    recipe.run.output_dir = recipe.run.output_dir.expanduser().resolve()
    recipe.run.storage_path = recipe.run.storage_path.expanduser().resolve()
    data = recipe.data
    if data.shards is not None:
        data.shards = data.shards.expanduser().resolve()
    if data.shards_cache is not None:
        data.shards_cache = data.shards_cache.expanduser().resolve()
    for dataset in data.datasets or []:
        dataset.folder = dataset.folder.expanduser().resolve()
    local = Path(recipe.model.path).expanduser()
    if local.is_dir():
        recipe.model.path = str(local.resolve())
    return recipe
