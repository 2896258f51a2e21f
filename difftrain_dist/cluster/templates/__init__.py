"""Script templates of the cluster files we write, with `@@name` placeholders (string.Template
with `@@` as the delimiter, so that the shell's own `$` and `${…}` stay as written)."""

from __future__ import annotations

from importlib.resources import files
from string import Template


class _ScriptTemplate(Template):
    delimiter = "@@"


def render_template(template: str, **values: str) -> str:
    """The template file `template` of this package with every `@@key` replaced by `values[key]`.

    Raises:
        KeyError: the template names a placeholder missing from `values`.
    """
    return _ScriptTemplate(files(__package__).joinpath(template).read_text()).substitute(values)
