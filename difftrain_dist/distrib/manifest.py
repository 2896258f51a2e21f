"""`rank_{r}.json`, the manifest each rank writes last into its part of a checkpoint: one typed
model, written and read only here.

Format (version 1)::

    {"version": 1, "global_rank": 0, "step": 12, "world_size": 2, "zero_stage": 2,
     "recipe_hash": "…", "resume_identity": {…}, "recipe": {…}, "lora_configs": {"unet": {…}},
     "loss": 0.0123, "state": {"step": 12, "samples_seen": 48, "epoch": 1, "batch_in_epoch": 3},
     "rng": {"python": […], "numpy": […], "torch": "…", "noise_generator": "…"},
     "host": "node-1", "node_id": "…", "pid": 4242, "saved_at": 1764450000.0,
     "peak_rss_mib": 2048.5, "files": {"step_000000012/…optim_states.pt": "<sha256>", …}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MANIFEST_VERSION = 1


class SavedState(BaseModel):
    """The rank's TrainState at the save: optimizer steps, samples consumed, data cursor."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    step: int = Field(ge=0)
    samples_seen: int = Field(ge=0)
    epoch: int = Field(ge=0)
    batch_in_epoch: int = Field(ge=0)


class RankManifest(BaseModel):
    """One rank's record of a checkpoint (see the module docstring for the JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    version: Literal[1] = MANIFEST_VERSION
    global_rank: int = Field(ge=0)
    step: int = Field(ge=0)
    """Optimizer steps completed (the folder's step)."""
    world_size: int = Field(ge=1)
    zero_stage: int = Field(ge=0, le=3)
    recipe_hash: str
    """`Recipe.recipe_hash()`: what may not change on resume."""
    resume_identity: dict[str, Any]
    """`Recipe.resume_identity()`: the fields behind the hash, to name what changed."""
    recipe: dict[str, Any]
    """The recipe the checkpoint was written with (JSON form)."""
    lora_configs: dict[str, dict[str, Any]]
    """Pipeline component → its LoRA config (`lora_config_dict`)."""
    loss: float
    """Mean loss over ranks of the step saved."""
    state: SavedState
    rng: dict[str, Any]
    """RNG states (`capture_rng`): python, numpy, torch CPU, CUDA when used, the noise generator."""
    host: str
    node_id: str
    pid: int
    saved_at: float
    """Unix time of the save, s."""
    peak_rss_mib: float
    files: dict[str, str]
    """Every other file this rank wrote, relative to the checkpoint folder → its sha256 (hex).
    Under ZeRO-0 only rank 0 writes files (the whole state); every other rank writes some."""

    @field_validator("files")
    @classmethod
    def _files_where_due(cls, files: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        rank, stage = info.data.get("global_rank"), info.data.get("zero_stage")
        if not files and (rank == 0 or (stage or 0) > 0):
            raise ValueError(f"rank {rank} of a ZeRO-{stage} checkpoint lists none")
        return files


def write_manifest(path: Path, manifest: RankManifest) -> None:
    """Write `manifest` to `path` atomically (a `.tmp` file renamed over it)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=True))
    tmp.replace(path)


def read_manifest(path: Path) -> tuple[RankManifest | None, str]:
    """The manifest at `path`, or None with the reason it cannot be used: unreadable, not a JSON
    object, or a field missing or wrong (named as `rank_0.json: world_size: <what pydantic says>`)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path.name} is unreadable ({err.__class__.__name__})"
    if not isinstance(raw, dict):
        return None, f"{path.name} is not a JSON object"
    try:
        return RankManifest.model_validate(raw), ""
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        return None, f"{path.name}: {where}: {first['msg'].removeprefix('Value error, ')}"
