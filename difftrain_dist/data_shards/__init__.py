"""Folders and tars → WebDataset shards (`build_shards`) and the balanced bucketed reader (`ShardStream`)."""

from .build import build_shards
from .captions import CaptionTransform
from .index import ShardIndex, merge_indexes
from .reader import ShardStream

__all__ = ["CaptionTransform", "ShardIndex", "ShardStream", "build_shards", "merge_indexes"]
