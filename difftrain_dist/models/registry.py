"""Architecture name → adapter class. New architectures add one line here."""

from __future__ import annotations

from difftrain_dist.models.base import DiffusionAdapter
from difftrain_dist.models.flux import FluxAdapter
from difftrain_dist.models.sd3 import SD3Adapter
from difftrain_dist.models.sd15 import SD15Adapter
from difftrain_dist.models.sdxl import SDXLAdapter

ADAPTERS: dict[str, type[DiffusionAdapter]] = {
    adapter.arch: adapter for adapter in (SD15Adapter, SDXLAdapter, SD3Adapter, FluxAdapter)
}


def get_adapter(arch: str) -> type[DiffusionAdapter]:
    """The adapter class registered under `arch` (e.g. "sd15", "sdxl", "sd3", "flux").

    Raises ValueError naming `arch` and listing the known architectures.
    """
    try:
        return ADAPTERS[arch]
    except KeyError:
        raise ValueError(
            f"arch: unknown architecture {arch!r}; known: {sorted(ADAPTERS)}"
        ) from None
