"""Re-sharding a checkpoint for another number of workers.

DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) turns a checkpoint's ZeRO
files into a universal checkpoint, which DeepSpeed loads at any world size; the data cursor is
rescaled to the same point of the epoch.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from difftrain_dist.data_shards.files import sha256_file
from difftrain_dist.distrib.checkpoint import CheckpointInfo, deepspeed_tag
from difftrain_dist.distrib.state import TrainState

UNIVERSAL_DIR = ".universal"


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


def resumed_state(info: CheckpointInfo, global_rank: int, world_size: int, batches_per_epoch: int) -> TrainState:
    """The TrainState a rank continues with.

    Same world size: exactly the rank's saved state. Another world size: the step and epoch carry
    over, the position in the epoch is rescaled to the same fraction of the epoch's samples.
    `batches_per_epoch` is the new stream's batch count per epoch for one rank.
    """
    manifests = info.manifests
    if len(manifests) == world_size:
        return TrainState(**manifests[global_rank].state.model_dump())
    old = manifests[0].state
    total_seen = sum(m.state.samples_seen for m in manifests)
    batch = math.ceil(old.batch_in_epoch * len(manifests) / world_size)
    epoch = old.epoch
    if batch >= batches_per_epoch:
        epoch, batch = epoch + 1, 0
    return TrainState(step=old.step, samples_seen=total_seen // world_size, epoch=epoch, batch_in_epoch=batch)
