"""Ray Train wiring: a TorchTrainer whose workers run :func:`train_worker`, plus driver-side progress."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.checkpoint import find_resume_checkpoint
from difftrain_dist.distrib.export import export_checkpoint
from difftrain_dist.distrib.progress import ProgressBoard, ProgressDisplay
from difftrain_dist.distrib.worker import train_worker
from difftrain_dist.quiet import quiet_env


class RaySession:
    """WorkerSession for Ray Train: metrics go to the driver's progress board, checkpoints through
    ``ray.train.report`` (Ray merges every rank's files into one checkpoint folder)."""

    def __init__(self, board):
        self.board = board

    def log(self, metrics: dict[str, Any]) -> None:
        self.board.push.remote(metrics)

    def persist_checkpoint(self, local_dir: Path, run_dir: Path, name: str, metrics: dict[str, Any]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(local_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        shutil.rmtree(local_dir, ignore_errors=True)
        dist.barrier()


def _ray_train_loop(config: dict[str, Any]) -> None:
    recipe = Recipe.model_validate(config["recipe"])
    train_worker(recipe, RaySession(config["board"]))


@dataclass
class TrainingResult:
    """What a finished run left behind."""

    lora_path: Path
    checkpoint: Path
    step: int


def init_ray(address: str | None, num_cpus_needed: float) -> None:
    """Join `address` (or RAY_ADDRESS), else start an embedded local cluster big enough for the job."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **common)
    else:
        num_cpus = max(os.cpu_count() or 1, int(num_cpus_needed + 0.999))
        ray.init(num_cpus=num_cpus, _temp_dir=tempfile.gettempdir() + "/ray", **common)


def worker_env_vars(recipe: Recipe) -> dict[str, str]:
    """Environment of the training workers: quiet library chatter unless the user set it."""
    env = quiet_env()
    if not recipe.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def build_trainer(recipe: Recipe, board) -> TorchTrainer:
    """The TorchTrainer for a recipe (gloo on CPU, NCCL on GPU)."""
    cfg = recipe.distributed
    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "board": board},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=recipe.run.name,
            storage_path=str(recipe.run.storage_path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": worker_env_vars(recipe)},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_training(recipe: Recipe, *, show_progress: bool = True) -> TrainingResult:
    """Train a recipe on Ray and consolidate the last checkpoint into `output_dir/<name>.safetensors`.

    Re-running the same recipe (same run name and storage path) resumes from the newest valid
    checkpoint.

    Raises:
        ray.train.TrainingFailedError: a worker failed more often than `distributed.max_failures`.
        RuntimeError: training finished but left no valid checkpoint.
    """
    init_ray(recipe.distributed.address, recipe.distributed.num_workers * recipe.distributed.cpus_per_worker)
    board = ProgressBoard.remote()
    trainer = build_trainer(recipe, board)
    with ProgressDisplay(board, recipe.train.max_steps, enabled=show_progress):
        trainer.fit()
    final, _ = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
    if final is None:
        raise RuntimeError(f"training finished but {recipe.run_dir} holds no valid checkpoint")
    lora_path = export_checkpoint(final.path, recipe.run.output_dir / f"{recipe.run.name}.safetensors")
    return TrainingResult(lora_path=lora_path, checkpoint=final.path, step=final.step)
