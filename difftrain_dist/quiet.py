"""Default environment that keeps library chatter out of the training log (user settings win)."""

from __future__ import annotations

import logging
import os

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    # huggingface_hub's bars, and transformers' ("Loading weights", "Writing model shards"), which
    # follow it; `quiet_diffusers_progress` makes diffusers' loading bar follow it too.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


LIBRARY_DEFAULTS = {"TRANSFORMERS_VERBOSITY": "warning", "DIFFUSERS_VERBOSITY": "warning",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
"""What the libraries do when QUIET_ENV's variables are unset (for `--verbose` workers)."""
_applied: set[str] = set()
"""The QUIET_ENV names `apply_quiet_env` set in this process (not the user's)."""


def quiet_env() -> dict[str, str]:
    """QUIET_ENV with any value the user already set in the environment."""
    return {name: os.environ.get(name, value) for name, value in QUIET_ENV.items()}


def library_env() -> dict[str, str]:
    """The libraries' own defaults for QUIET_ENV's variables, but the values the user set."""
    return {name: os.environ[name] if name in os.environ and name not in _applied else value
            for name, value in LIBRARY_DEFAULTS.items()}


def apply_quiet_env() -> None:
    """Set QUIET_ENV in this process where the user has not (call before importing transformers)."""
    for name, value in QUIET_ENV.items():
        if name not in os.environ:
            os.environ[name] = value
            _applied.add(name)


QUIET_LOGGERS = {
    # Warns at import on CPUs with AVX512-BF16 that a 4-bit matmul kernel is missing; this project
    # uses bitsandbytes for 8-bit optimizer states only. transformers and peft import it when it is
    # installed, so the line would open every process's log.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_diffusers_progress() -> None:
    """Turn off diffusers' loading bars ("Loading pipeline components...") when huggingface_hub's
    are off (HF_HUB_DISABLE_PROGRESS_BARS, on by QUIET_ENV); call after importing diffusers."""
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on"):
        diffusers_logging.disable_progress_bar()


DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
"""DeepSpeed's warning when it picks its accelerator by itself and finds none. accelerate imports
DeepSpeed whenever both are installed, so every command that loads a diffusers model printed it;
the workers set DS_ACCELERATOR and never see it."""


def _not_the_cpu_notice(record: logging.LogRecord) -> bool:
    return record.getMessage() != DEEPSPEED_CPU_NOTICE


def quiet_deepspeed_cpu_notice() -> None:
    """Drop DEEPSPEED_CPU_NOTICE from DeepSpeed's logger (named "DeepSpeed"; DeepSpeed keeps the
    logger object, and with it this filter, when it is imported later). For the CLI's own
    process: its commands other than `worker` do not use DeepSpeed's accelerator, and `worker`
    gets DS_ACCELERATOR from its launcher or fails clearly at the process group."""
    logger = logging.getLogger("DeepSpeed")
    if _not_the_cpu_notice not in logger.filters:
        logger.addFilter(_not_the_cpu_notice)


def quiet_loggers() -> None:
    """Raise the level of QUIET_LOGGERS (loggers that the user configured keep their level)."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
