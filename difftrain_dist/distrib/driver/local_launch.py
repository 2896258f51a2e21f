"""Run the worker loop in a process group from the environment: one process per rank, started by
torchrun or srun, or one actor per rank on the embedded Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import ShardIndex
from difftrain_dist.distrib.driver.datasets import build_datasets
from difftrain_dist.distrib.driver.finish import TrainingResult, finish_run
from difftrain_dist.distrib.loop import train_worker
from difftrain_dist.distrib.preflight import check_data_fits_model
from difftrain_dist.distrib.session import LocalSession, WorkerSession

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"}


def _env_from_slurm() -> None:
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if slurm in os.environ and torch_name not in os.environ:
            os.environ[torch_name] = os.environ[slurm]


def run_local_worker(recipe: Recipe) -> tuple[Path | None, bool]:
    """Train this rank with `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` from the environment
    (torchrun sets them; under srun `SLURM_PROCID`/`SLURM_NTASKS` are used).

    Returns:
        (LoRA file, stopped early): on rank 0 the consolidated `output_dir/<name>.safetensors`
        (the last checkpoint's `lora.safetensors` when stopped early), None on other ranks;
        stopped early is True when SIGTERM/SIGUSR1 ended the run before `train.max_steps` (its
        last checkpoint is saved; run again to continue).

    Raises:
        ValueError: the rendezvous variables are missing.
    """
    _env_from_slurm()
    done, stopped_early = train_rank(recipe, LocalSession(), build_data=True)
    if done is None:
        return None, stopped_early
    return done.lora_path, done.preempted


def train_rank(recipe: Recipe, session: WorkerSession, *, build_data: bool) -> tuple[TrainingResult | None, bool]:
    """Join the process group the environment names (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    `MASTER_PORT`, and `LOCAL_RANK` for the GPU), train this rank, and on rank 0 end the run
    (`finish_run`). `build_data`: rank 0 builds the recipe's image folders into shards first.

    Returns:
        (rank 0's TrainingResult, None on other ranks; whether a stop ended the loop early).

    Raises:
        ValueError: the rendezvous variables are missing.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"run under torchrun or srun: environment lacks {', '.join(missing)}")
    if recipe.distributed.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if recipe.distributed.use_gpu else "gloo")
    try:
        if build_data:
            shared_datasets(recipe)
        check_data_fits_model(recipe, ShardIndex.load(recipe.data.shards))
        result = train_worker(recipe, session)
        dist.barrier()
        if dist.get_rank() != 0:
            return None, result.stopped_early
        return finish_run(recipe, result.checkpoint, stopped_early=result.stopped_early), result.stopped_early
    finally:
        dist.destroy_process_group()


def shared_datasets(recipe: Recipe) -> None:
    """Rank 0 builds the recipe's image folders into shards (or finds them built) while the other
    ranks wait, then tells them where they are; a failed build stops every rank."""
    if recipe.data.datasets is None:
        return
    message: list = [None, None, None]  # error, shards folder, resolution
    if dist.get_rank() == 0:
        try:
            build_datasets(recipe)
            message[1:] = [str(recipe.data.shards), recipe.data.resolution]
        except ValueError as err:
            message[0] = str(err)
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise ValueError(message[0])
    if dist.get_rank() != 0:
        recipe.data.shards, recipe.data.resolution = Path(message[1]), message[2]
        recipe.forget_identity()
