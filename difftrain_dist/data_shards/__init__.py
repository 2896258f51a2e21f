"""Folder → WebDataset shards (`build_shards`) and the balanced streaming reader (`ShardStream`)."""

from .build import build_shards
from .index import ShardIndex
from .reader import ShardStream

__all__ = ["ShardIndex", "ShardStream", "build_shards"]
