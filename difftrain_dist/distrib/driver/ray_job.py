"""A run on a Ray cluster the driver joins: a TorchTrainer whose workers run :func:`train_worker`."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.driver.finish import TrainingResult, finish_run
from difftrain_dist.distrib.driver.progress import (
    ProgressBoard,
    ProgressDisplay,
    board_drain,
    logs_to_board,
    stop_on_signals,
)
from difftrain_dist.distrib.driver.ray_cluster import init_ray, worker_env_vars


class RaySession:
    """WorkerSession for Ray Train: metrics go to the driver's progress board, checkpoints through
    ``ray.train.report`` (Ray merges every rank's files into one checkpoint folder)."""

    def __init__(self, board):
        self.board = board
        self._stop_ref = board.stop_requested.remote()
        self._stopped = False

    def log(self, metrics: dict[str, Any]) -> None:
        self.board.push.remote(metrics)

    def stop_requested(self) -> bool:
        """Non-blocking: looks at the driver's answer only once it has arrived."""
        if not self._stopped:
            ready, _ = ray.wait([self._stop_ref], timeout=0)
            if ready:
                self._stopped = ray.get(ready[0])
                self._stop_ref = self.board.stop_requested.remote()
        return self._stopped

    def node_id(self) -> str:
        """Ray's id of this worker's node."""
        return ray.get_runtime_context().get_node_id()

    def persist_checkpoint(self, local_dir: Path, run_dir: Path, name: str, metrics: dict[str, Any]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(local_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        shutil.rmtree(local_dir, ignore_errors=True)
        dist.barrier()


def _ray_train_loop(config: dict[str, Any]) -> None:
    # The worker's stack (diffusers, peft, DeepSpeed) is imported here, on the workers: the driver
    # never needs it, and importing it there cost every run seconds before Ray even started.
    from difftrain_dist.distrib.loop import train_worker

    recipe = Recipe.model_validate(config["recipe"])
    board = config["board"]
    with logs_to_board(board.note.remote, ray.train.get_context().get_world_rank()):
        train_worker(recipe, RaySession(board))


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


def fit_off_the_main_thread(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()` in a helper thread; the main thread waits, so that the signals reach
    `stop_on_signals`. On the main thread Ray Train installs its own SIGINT handler, which aborts
    the run without a checkpoint (and the driver exits 1); it leaves other threads alone.

    Returns what `fit` returned. Raises what `fit` raised; KeyboardInterrupt (a second signal)
    while `fit` still runs.
    """
    failure: list[BaseException] = []
    result: list[ray.train.Result] = []

    def fit() -> None:
        try:
            result.append(trainer.fit())
        except BaseException as err:  # handed to the main thread
            failure.append(err)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # signal handlers run in between
    if failure:
        raise failure[0]
    return result[0]


def forget_ray_run_snapshot(run_dir: Path) -> None:
    """Drop Ray Train's own checkpoint bookkeeping from an earlier job of this run.

    Our checkpoint manager decides what to resume from and removes checkpoints (keep_last,
    invalid ones set aside); Ray's snapshot would still list them and refuse to start.
    """
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # the file name of Ray 2.4x-2.6x
        name = "checkpoint_manager_snapshot.json"
    (run_dir / name).unlink(missing_ok=True)


def run_on_cluster(recipe: Recipe, *, show_progress: bool) -> TrainingResult:
    """`launch.run_training` on the Ray cluster at `distributed.address` (or RAY_ADDRESS, or the
    one this process is connected to): Ray Train runs the job; the end is `finish_run` here."""
    from difftrain_dist.distrib.driver.launch import save_run_recipe

    cfg = recipe.distributed
    init_ray(cfg.address, cfg.num_workers * cfg.cpus_per_worker)
    save_run_recipe(recipe)
    forget_ray_run_snapshot(recipe.run_dir)
    # On the driver's node: a lost worker node must not take the progress board (and the stop
    # flag) with it while Ray restarts the worker group.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ProgressBoard.options(scheduling_strategy=here).remote()
    trainer = build_trainer(recipe, board)
    with stop_on_signals(board.request_stop.remote) as signals, ProgressDisplay(
            board_drain(board), recipe.train.max_steps, enabled=show_progress):
        result = fit_off_the_main_thread(trainer)
    # Ray's last reported checkpoint, by name in our run folder (Ray may spell the path otherwise)
    last = recipe.run_dir / Path(result.checkpoint.path).name if result.checkpoint else None
    return finish_run(recipe, last, stopped_early=bool(signals))
