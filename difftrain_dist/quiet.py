"""Default environment that keeps library chatter out of the training log (user settings win)."""

from __future__ import annotations

import os

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


def quiet_env() -> dict[str, str]:
    """QUIET_ENV with any value the user already set in the environment."""
    return {name: os.environ.get(name, value) for name, value in QUIET_ENV.items()}


def apply_quiet_env() -> None:
    """Set QUIET_ENV in this process where the user has not (call before importing transformers)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
