"""Architecture name → adapter class. New architectures add one line here."""

from __future__ import annotations

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.sd15 import SD15Adapter

ADAPTERS: dict[str, type[DiffusionAdapter]] = {
    SD15Adapter.arch: SD15Adapter,
}


def get_adapter(arch: str) -> type[DiffusionAdapter]:
    """The adapter class registered under `arch` (e.g. "sd15").

    Raises ValueError naming `arch` and listing the known architectures.
    """
    try:
        return ADAPTERS[arch]
    except KeyError:
        raise ValueError(
            f"arch: unknown architecture {arch!r}; known: {sorted(ADAPTERS)}"
        ) from None
