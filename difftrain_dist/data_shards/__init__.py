"""Folders and tars → WebDataset shards (`build_shards`) and the balanced bucketed reader (`ShardStream`).

The names below are imported on first use, so that reading an index (`ShardIndex`, which the
driver does before a run) does not import the reader's and writer's libraries (torch, webdataset).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_shards": "build",
    "CaptionTransform": "captions",
    "ShardIndex": "index",
    "merge_indexes": "index",
    "ShardStream": "reader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
