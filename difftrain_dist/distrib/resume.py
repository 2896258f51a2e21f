"""Choosing and loading the checkpoint a run continues from, on every resume path.

Re-running a recipe, `difftrain-dist resume RUN_DIR` and Ray restarting a crashed worker group all
come here: rank 0 picks the newest valid checkpoint (setting aside newer, invalid ones), every
rank loads it. Under Ray the driver sets aside the invalid checkpoints it finds before the job
starts and says so itself; rank 0's lines (after a restart mid-job) reach it through the progress
board. A checkpoint written by a different number of workers is first converted into a DeepSpeed
universal checkpoint, which DeepSpeed re-shards for the new world size.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from difftrain_dist.config import Recipe, changed_fields
from difftrain_dist.data_shards.index import sha256_file
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
    reshard_data: bool = False
    """The checkpoint was written by another world size: rescale the data cursor."""

    @property
    def reshard(self) -> bool:
        """True when DeepSpeed must load a universal conversion (another world size, ZeRO ≥ 1)."""
        return self.checkpoint is not None and self.load_dir != self.checkpoint.path


def set_aside(info: CheckpointInfo) -> Path:
    """Rename an invalid checkpoint folder out of the way (never delete it): `<name>.invalid-<time>`."""
    target = info.path.with_name(f"{info.path.name}.invalid-{int(time.time())}")
    info.path.rename(target)
    return target


def set_aside_skipped(skipped: list[CheckpointInfo]) -> list[str]:
    """Set aside each checkpoint `choose_checkpoint` skipped; returns one line per checkpoint
    saying why: `skipping checkpoint_000000012: <reason> (kept as checkpoint_000000012.invalid-<time>)`."""
    return [f"skipping {bad.path.name}: {bad.reason} (kept as {set_aside(bad).name})" for bad in skipped]


def choose_checkpoint(recipe: Recipe) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """The newest valid checkpoint of the run and the newer ones skipped; changes nothing.

    Raises:
        ValueError: the run folder holds intact checkpoints, but all of another recipe (the
            message names the changed fields), or the recipe cannot continue from the newest one.
    """
    info, skipped = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
    if info is None and (other := next((s for s in skipped if s.recipe_mismatch), None)):
        _refuse_earlier_format(other)
        changed = changed_fields(other.manifests[0].get("resume_identity", {}), recipe.resume_identity())
        raise ValueError(
            f"{recipe.run_dir} holds checkpoints of another recipe (changed: {', '.join(changed) or 'unknown'}); "
            "put those settings back to continue it, or choose another run.name"
        )
    if info is not None:
        check_compatible(info, recipe)
    return info, skipped


def _choose_on_rank0(recipe: Recipe) -> str | None:
    info, skipped = choose_checkpoint(recipe)
    for line in set_aside_skipped(skipped):
        log.warning("%s", line)
    return None if info is None else str(info.path)


def universal_dir(info: CheckpointInfo, run_dir: Path) -> Path:
    """Where the universal conversion of `info` lives: named by the checkpoint and a digest of its
    rank-0 manifest, so a later checkpoint reusing the folder name never hits a stale conversion."""
    digest = sha256_file(info.path / "rank_0.json")[:16]
    return run_dir / UNIVERSAL_DIR / f"{info.path.name}-{digest}"


def to_universal(info: CheckpointInfo, run_dir: Path) -> Path:
    """Convert a checkpoint's DeepSpeed files into a universal checkpoint under `run_dir/.universal/`
    (DeepSpeed's own converter, `deepspeed.checkpoint.ds_to_universal`), atomically; conversions
    of other checkpoints are removed.

    Raises:
        ValueError: the conversion failed (its output is included).
    """
    out = universal_dir(info, run_dir)
    tag = deepspeed_tag(info.step)
    if (out / "latest").is_file():
        return out
    for stale in out.parent.glob("checkpoint_*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(info.path / tag), "--output_folder", str(partial / tag), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (partial / tag / "mp_rank_00_model_states.pt").is_file():
        raise ValueError(f"cannot re-shard {info.path} for a new world size: {proc.stderr[-2000:]}")
    (partial / "latest").write_text(tag)
    partial.rename(out)
    return out


def _refuse_earlier_format(info: CheckpointInfo) -> None:
    """Checkpoints of difftrain-dist 0.1 name LoRA weights without their pipeline component and
    record one `lora_config`: their weights would not load into today's engine, so say so."""
    if "lora_configs" not in info.manifests[0]:
        raise ValueError(
            f"{info.path} was written by an earlier difftrain-dist (one LoRA component, other parameter "
            f"names) and cannot be resumed; `difftrain-dist export {info.path} -o FILE` still gives its LoRA, "
            "and a new run.name starts afresh"
        )


def check_compatible(info: CheckpointInfo, recipe: Recipe) -> None:
    """Raise ValueError when the run cannot continue from `info` with this recipe's settings."""
    _refuse_earlier_format(info)
    stage = info.manifests[0].get("zero_stage")
    if stage != recipe.distributed.zero_stage:
        raise ValueError(
            f"distributed.zero_stage: {info.path.name} was written with ZeRO-{stage}, this run asks for "
            f"ZeRO-{recipe.distributed.zero_stage}; changing the ZeRO stage on resume is not supported "
            f"(set distributed.zero_stage={stage})"
        )


def plan_resume(recipe: Recipe) -> ResumePlan:
    """Collective: every rank gets the same plan; rank 0 scans, sets aside and converts."""
    message = [None, None]  # [chosen checkpoint path, error]
    if dist.get_rank() == 0:
        try:
            message[0] = _choose_on_rank0(recipe)
        except ValueError as err:
            message[1] = str(err)
    dist.broadcast_object_list(message, src=0)
    if message[1]:
        raise ValueError(message[1])
    if message[0] is None:
        return ResumePlan()
    info = inspect_checkpoint(Path(message[0]), recipe.recipe_hash())
    if not info.valid:
        raise ValueError(f"checkpoint {info.path} became invalid while resuming: {info.reason}")
    if info.world_size == dist.get_world_size():
        return ResumePlan(info, info.path)
    if recipe.distributed.zero_stage == 0:  # no partitioned state: any world size loads it as is
        return ResumePlan(info, info.path, reshard_data=True)
    error = [None]
    if dist.get_rank() == 0:
        log.warning("re-sharding %s from %d to %d workers", info.path.name, info.world_size, dist.get_world_size())
        try:
            to_universal(info, recipe.run_dir)
        except ValueError as err:
            error[0] = str(err)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    return ResumePlan(info, universal_dir(info, recipe.run_dir), reshard_data=True)


def resumed_state(plan: ResumePlan, global_rank: int, world_size: int, batches_per_epoch) -> TrainState:
    """The TrainState a rank continues with.

    Same world size: exactly the rank's saved state. Another world size: the step and epoch carry
    over, the position in the epoch is rescaled to the same fraction of the epoch's samples.
    `batches_per_epoch` is the new stream's batch count per epoch for one rank.
    """
    manifests: list[dict[str, Any]] = plan.checkpoint.manifests
    if not plan.reshard_data:
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
