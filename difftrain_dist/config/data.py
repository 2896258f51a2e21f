"""The `data` section of a recipe: a shard folder, or image folders built into shards on first use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .common import Section, checks_paths

if TYPE_CHECKING:
    from difftrain_dist.data_shards.index import ShardIndex


class DatasetFolder(Section):
    """An image folder (captions beside the images) built into shards on first use; the
    caption options left None take the `data` section's."""

    folder: Path
    """Folder of images and caption files, searched recursively."""
    resolutions: list[int] | None = Field(None, min_length=1)
    """Bucket resolutions in px (√area) each image is written at; None: [data.resolution]."""
    caption_ext: str = ".txt"
    """Extension of the caption file beside each image (a leading dot is added when missing)."""
    default_caption: str | None = None
    """Caption of images without one; None skips them (each one reported)."""
    num_repeats: int = Field(1, ge=1)
    """Times each image is seen per epoch (ai-toolkit's `num_repeats`)."""
    caption_dropout: float | None = Field(None, ge=0.0, le=1.0)
    shuffle_captions: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)

    @field_validator("caption_ext")
    @classmethod
    def _dotted(cls, value: str) -> str:
        return value if value.startswith(".") else f".{value}"

    @field_validator("resolutions")
    @classmethod
    def _sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(r < 64 or r % 8 for r in value):
            raise ValueError(f"each resolution must be a multiple of 8 px, at least 64; got {value}")
        return value


class DataSection(Section):
    shards: Path | None = None
    """Folder holding `index.json` and `shard-*.tar` written by `difftrain-dist shards build`;
    set for you when `datasets` names image folders instead."""
    datasets: list[DatasetFolder] | None = Field(None, min_length=1)
    """Image folders to train on, built into shards in `shards_cache` when a run starts (and
    reused while their files stay the same); give either this or `shards`."""
    shards_cache: Path | None = None
    """Where shards built from `datasets` are kept; None: `<run.storage_path>/.shards-cache`."""
    resolution: int | None = Field(None, ge=64, multiple_of=8)
    """Bucket resolution in pixels (√area) the shards were built at; None takes the shards' largest."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per rank per forward pass."""
    loader_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Probability (0-1) that a sample's caption is replaced by "" in an epoch."""
    shuffle_captions: bool = False
    """Shuffle each caption's comma-separated tags every epoch (after the first `keep_tokens`)."""
    keep_tokens: int = Field(0, ge=0)
    """Leading comma-separated tags (count) that `shuffle_captions` leaves in place."""
    trigger_word: str | None = None
    """Trigger word (text): fills `[trigger]`/`[name]` and is prepended to captions lacking it."""

    @field_validator("shards")
    @classmethod
    def _index_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and checks_paths(info) and not (value.expanduser() / "index.json").is_file():
            raise ValueError(f"no index.json in {str(value)!r}; build shards with `difftrain-dist shards build`")
        return value

    @model_validator(mode="after")
    def _shards_or_folders(self, info: ValidationInfo) -> DataSection:
        if self.datasets is None:
            if self.shards is None:
                raise ValueError("give shards (a folder built by `difftrain-dist shards build`) or datasets "
                                 "(image folders, built when the run starts)")
        elif self.resolution is None and any(d.resolutions is None for d in self.datasets):
            raise ValueError("datasets: give each folder its resolutions, or data.resolution for all of them")
        if self.datasets is not None and self.shards is None:
            return self
        if not checks_paths(info):
            return self
        built = read_index(self.shards.expanduser()).resolutions
        if self.resolution is None:
            if not built:
                raise ValueError("resolution: the shards list none they were built at; set data.resolution")
            if max(built) < 64 or max(built) % 8:
                raise ValueError(f"resolution: the shards were built at {max(built)} px; training takes "
                                 "multiples of 8 px, at least 64")
            self.__dict__["resolution"] = max(built)
        elif built and self.resolution not in built:
            raise ValueError(f"resolution {self.resolution}, but the shards were built at {built}")
        return self


def read_index(folder: Path) -> ShardIndex:
    from difftrain_dist.data_shards.index import ShardIndex  # the data package imports torch

    return ShardIndex.load(folder)
