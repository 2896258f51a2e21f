"""Choosing and loading the checkpoint a run continues from, on every resume path.

Re-running a recipe, `difftrain-dist resume RUN_DIR` and Ray restarting a crashed worker group all
come here: rank 0 picks the newest valid checkpoint (setting aside newer, invalid ones), every
rank loads it. A checkpoint written by a different number of workers is first converted into a
DeepSpeed universal checkpoint, which DeepSpeed re-shards for the new world size.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.checkpoint import CheckpointInfo, deepspeed_tag, find_resume_checkpoint, inspect_checkpoint
from difftrain_dist.distrib.state import TrainState, restore_rng

log = logging.getLogger("difftrain_dist")
UNIVERSAL_DIR = ".universal"


@dataclass
class ResumePlan:
    """The checkpoint to continue from, or a fresh start when `checkpoint` is None."""

    checkpoint: CheckpointInfo | None = None
    load_dir: Path | None = None
    """Folder handed to `engine.load_checkpoint` (the checkpoint, or its universal conversion)."""

    @property
    def reshard(self) -> bool:
        """True when the checkpoint was written by another world size (universal loading)."""
        return self.checkpoint is not None and self.load_dir != self.checkpoint.path


def set_aside(info: CheckpointInfo) -> Path:
    """Rename an invalid checkpoint folder out of the way (never delete it): `<name>.invalid-<time>`."""
    target = info.path.with_name(f"{info.path.name}.invalid-{int(time.time())}")
    info.path.rename(target)
    return target


def _choose_on_rank0(recipe: Recipe) -> str | None:
    info, skipped = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
    for bad in skipped:
        log.warning("skipping %s: %s (kept as %s)", bad.path.name, bad.reason, set_aside(bad).name)
    return None if info is None else str(info.path)


def to_universal(info: CheckpointInfo, run_dir: Path) -> Path:
    """Convert a checkpoint's DeepSpeed files into a universal checkpoint under `run_dir/.universal/`.

    Uses DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`).

    Raises:
        ValueError: the conversion failed (its output is included).
    """
    out = run_dir / UNIVERSAL_DIR / info.path.name
    tag = deepspeed_tag(info.step)
    done = out / tag / "mp_rank_00_model_states.pt"
    if done.is_file():
        return out
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(info.path / tag), "--output_folder", str(out / tag), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not done.is_file():
        raise ValueError(f"cannot re-shard {info.path} for a new world size: {proc.stderr[-2000:]}")
    (out / "latest").write_text(tag)
    return out


def plan_resume(recipe: Recipe) -> ResumePlan:
    """Collective: every rank gets the same plan; rank 0 scans, sets aside and converts."""
    choice = [_choose_on_rank0(recipe) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return ResumePlan()
    info = inspect_checkpoint(Path(choice[0]), recipe.recipe_hash())
    if not info.valid:
        raise ValueError(f"checkpoint {info.path} became invalid while resuming: {info.reason}")
    if info.world_size == dist.get_world_size():
        return ResumePlan(info, info.path)
    if dist.get_rank() == 0:
        log.warning("re-sharding %s from %d to %d workers", info.path.name, info.world_size, dist.get_world_size())
    error = [None]
    if dist.get_rank() == 0:
        try:
            to_universal(info, recipe.run_dir)
        except ValueError as err:
            error[0] = str(err)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    return ResumePlan(info, recipe.run_dir / UNIVERSAL_DIR / info.path.name)


def resumed_state(plan: ResumePlan, global_rank: int, world_size: int, batches_per_epoch) -> TrainState:
    """The TrainState a rank continues with.

    Same world size: exactly the rank's saved state. Another world size: the step and epoch carry
    over, the position in the epoch is rescaled to the same fraction of the epoch's samples.
    `batches_per_epoch` is the new stream's batch count per epoch for one rank.
    """
    manifests: list[dict[str, Any]] = plan.checkpoint.manifests
    if not plan.reshard:
        return TrainState(**manifests[global_rank]["state"])
    old = manifests[0]["state"]
    old_world = len(manifests)
    total_seen = sum(m["state"]["samples_seen"] for m in manifests)
    batch = math.ceil(old["batch_in_epoch"] * old_world / world_size)
    epoch = old["epoch"]
    if batch >= batches_per_epoch:
        epoch, batch = epoch + 1, 0
    return TrainState(step=old["step"], samples_seen=total_seen // world_size, epoch=epoch, batch_in_epoch=batch)


def restore_rank_rng(plan: ResumePlan, global_rank: int, noise_generator) -> None:
    """Restore this rank's RNG states (ranks new to a re-sharded run keep their fresh seeds)."""
    manifests = plan.checkpoint.manifests
    if global_rank < len(manifests):
        restore_rng(manifests[global_rank]["rng"], noise_generator)
