"""Secrets from a `.env` file (HF_TOKEN, WANDB_API_KEY, …), as ai-toolkit reads them.

The file is parsed with python-dotenv (`KEY=value` lines, quotes, `export`, comments). Values go
into the environment or a Ray runtime_env and are never printed: the CLI shows key names only,
and text it relays from a job (its logs) passes through `redact` first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from dotenv import dotenv_values

DEFAULT_ENV_FILE = Path(".env")
MASK = "****"
_MIN_SECRET_LENGTH = 4
"""Shorter values are not masked in relayed text (masking "1" would garble every number)."""


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY → value` from a `.env` file; keys without a value are left out.

    Raises ValueError naming the file when it does not exist or is not readable text.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--env-file: no such file {path}")
    try:
        values = dotenv_values(path, interpolate=False)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--env-file {path}: cannot read it ({error})") from None
    return {key: value for key, value in values.items() if value is not None}


def load_env_file(path: Path = DEFAULT_ENV_FILE, *, required: bool = False) -> dict[str, str]:
    """Read `path` (if present, or always when `required`) and set every key that the
    environment does not already have, as python-dotenv's `load_dotenv` does (the environment
    wins). Returns what the file holds."""
    if not Path(path).is_file() and not required:
        return {}
    values = read_env_file(path)
    for key, value in values.items():
        os.environ.setdefault(key, value)
    return values


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value of at least 4 characters replaced by "****"."""
    for value in sorted({s for s in secrets if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def describe(values: Mapping[str, str]) -> str:
    """"KEY1, KEY2" (names only), or "none"."""
    return ", ".join(sorted(values)) or "none"
