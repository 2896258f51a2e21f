"""Recipes pasted or uploaded into the dashboard: validation errors placed at their field's line."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difftrain_dist.config import Recipe, load_recipe
from difftrain_dist.distrib.metrics import wandb_problem

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
"""A recipe is a few hundred nodes; more once aliases are expanded is an alias bomb."""
MAX_MESSAGE = 1000
_ERROR_LINE = re.compile(r"^\s+(?P<field>[\w.\[\]-]+): (?P<message>.+)$")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass
class FieldError:
    field: str
    """Dotted path, e.g. `train.lr` or `config.process[0].network.linear_alpa`; "" for the file."""
    message: str
    line: int | None = None
    """1-based line of the field's key in the YAML text, when it is there."""


@dataclass
class Checked:
    recipe: Recipe | None
    errors: list[FieldError] = field(default_factory=list)
    file: Path | None = None


def field_line(text: str, dotted: str) -> int | None:
    """1-based line of the key `dotted` (`a.b[0].c`) in YAML `text`; the nearest enclosing key that
    is there when the field itself is missing; None when not even the first key is."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for name, index in _PART.findall(dotted):
        if isinstance(node, yaml.MappingNode) and name:
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == name), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and index and int(index) < len(node.value):
            node = node.value[int(index)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def expanded_size(node: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of a composed YAML document once its aliases are expanded (counting stops past
    `limit`); aliases share node objects, so each distinct node is sized once."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = limit + 1  # a node inside itself (a recursive alias) counts as too big
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(node)


def errors_of(message: str, text: str) -> list[FieldError]:
    """A RecipeError's message ("invalid recipe X:" then one "  field: message" line each) as
    FieldErrors with their lines; a message of another shape is one error without a field."""
    found = [FieldError(m["field"], _short(m["message"]), field_line(text, m["field"]))
             for line in message.splitlines()[1:] if (m := _ERROR_LINE.match(line))]
    return found or [FieldError("", _short(message))]


def _short(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " …"


def check_recipe(text: str, folder: Path, runs_dir: Path, *, check_paths: bool = True) -> Checked:
    """Validate recipe `text` (native or an ai-toolkit job) as `difftrain-dist train` would, with
    `run.storage_path` set to the dashboard's runs folder. A valid text is kept as a file in
    `folder` (the driver reads it from there); nothing is kept for an invalid one. Texts over
    1 MiB, or over 100 000 YAML nodes with their aliases expanded, are refused unread."""
    if len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES:
        return Checked(None, [FieldError("", f"the recipe is over {MAX_RECIPE_BYTES} bytes")])
    try:
        node = yaml.compose(text)
        if node is not None and expanded_size(node) > MAX_YAML_NODES:
            return Checked(None, [FieldError("", f"the recipe expands to over {MAX_YAML_NODES} YAML nodes "
                                                 "(aliases); write it out plainly")])
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return Checked(None, [FieldError("", _short(f"not valid YAML: {err}"), mark.line + 1 if mark else None)])
    if not isinstance(raw, dict):
        return Checked(None, [FieldError("", "a recipe is a YAML mapping of sections (run, model, data, train, ...)")])
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"recipe-{time.time_ns()}.yaml"
    file.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(file, replace={"run.storage_path": str(runs_dir)}, check_paths=check_paths)
    except ValueError as err:
        errors = errors_of(str(err), text)
    except Exception as err:  # noqa: BLE001 (a shape the loaders did not foresee: said, never a 500)
        errors = [FieldError("", _short(f"cannot read this recipe: {type(err).__name__}: {err}"))]
    else:
        problem = wandb_problem(recipe) if check_paths else None  # local runs read this environment
        if problem is None:
            return Checked(recipe, [], file)
        errors = [FieldError("logging.wandb", problem, field_line(text, "logging.wandb"))]
    file.unlink(missing_ok=True)
    return Checked(None, errors)
