"""Default environment that keeps library chatter out of the training log (user settings win)."""

from __future__ import annotations

import logging
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


QUIET_LOGGERS = {
    # Warns at import on CPUs with AVX512-BF16 that a 4-bit matmul kernel is missing; this project
    # uses bitsandbytes for 8-bit optimizer states only. transformers and peft import it when it is
    # installed, so the line would open every process's log.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_loggers() -> None:
    """Raise the level of QUIET_LOGGERS (loggers that the user configured keep their level)."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
