"""Ray Train wiring: a TorchTrainer whose workers run :func:`train_worker`, plus driver-side progress."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch.distributed as dist
import yaml
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import ShardIndex
from difftrain_dist.distrib.checkpoint import choose_checkpoint, set_aside_skipped
from difftrain_dist.distrib.driver.finish import TrainingResult, finish_run
from difftrain_dist.distrib.driver.progress import ProgressBoard, ProgressDisplay, logs_to_board, say
from difftrain_dist.distrib.metrics import WANDB_ENV, wandb_problem
from difftrain_dist.distrib.preflight import check_data_fits_model
from difftrain_dist.distrib.session import STOP_SIGNALS
from difftrain_dist.quiet import quiet_env


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
    with logs_to_board(board, ray.train.get_context().get_world_rank()):
        train_worker(recipe, RaySession(board))


def starts_embedded_cluster(address: str | None) -> bool:
    """True when `init_ray(address, …)` would start an embedded local cluster (no `address`, no
    RAY_ADDRESS, Ray not initialised yet): whoever calls it then ends the cluster."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None, num_cpus_needed: float) -> None:
    """Join `address` (or RAY_ADDRESS), else start an embedded local cluster big enough for the job.

    The embedded cluster is always a new one (Ray's `address="local"`): without it Ray would join
    whatever cluster it finds on the machine (the address file in its temp folder, written by
    `ray start` and by `ray.cluster_utils`), another user's run or one a killed process left.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **common)
        return
    num_cpus = max(os.cpu_count() or 1, int(num_cpus_needed + 0.999))
    with ray_processes_in_own_session():
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tempfile.gettempdir() + "/ray", **common)


EMBEDDED_TRAIN_ENV = {
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Prometheus metrics: an embedded cluster has no scraper
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one node that is never drained
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller sees the workers end sooner (default 2)
}
"""Ray Train settings for a run on an embedded cluster (ray/train/v2/_internal/constants.py):
two helper actors fewer, each a process that costs seconds of start-up. A value the user set wins."""


@contextlib.contextmanager
def embedded_train_env(embedded: bool) -> Iterator[None]:
    """While inside, and only when `embedded`: `EMBEDDED_TRAIN_ENV` in the environment, where
    Ray Train reads it (the driver, and the controller it passes the variables to). A cluster
    run keeps Ray's defaults."""
    added = {k: v for k, v in EMBEDDED_TRAIN_ENV.items() if k not in os.environ} if embedded else {}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def ray_processes_in_own_session() -> Iterator[None]:
    """While inside, the processes Ray starts for an embedded cluster (GCS, raylet, dashboard and,
    through the raylet, the workers) start in a session of their own.

    Ray starts them in the driver's process group, so a terminal's Ctrl+C, which goes to the whole
    foreground group, reached them too: Ray blocks SIGINT in them, but not in the dashboard's
    module processes, which died of it and took Ray's State API with them. In their own session
    only the driver hears the terminal. They still end with the driver: on Linux Ray ties them to
    it with PR_SET_PDEATHSIG, which does not depend on sessions (without that kernel support Ray
    kills its process group instead, so nothing is changed there). Ray (2.5x-2.6x) has no option
    for this; it starts these processes through `ray._private.services.ConsolePopen`.
    """
    from ray._private import services, utils

    popen = getattr(services, "ConsolePopen", None)
    if popen is None or not utils.detect_fate_sharing_support():
        yield
        return

    class NewSessionPopen(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "start_new_session": True})

    services.ConsolePopen = NewSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


def worker_env_vars(recipe: Recipe) -> dict[str, str]:
    """Environment of the training workers: quiet library chatter unless the user set it, and the
    driver's W&B settings when the recipe logs there."""
    env = quiet_env()
    if recipe.logging.wandb:
        env.update({name: os.environ[name] for name in WANDB_ENV if name in os.environ})
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


@contextlib.contextmanager
def stop_on_signals(board) -> Iterator[list[int]]:
    """While inside, SIGTERM/SIGUSR1/SIGINT to the driver ask the workers to stop after their
    current step (they save a checkpoint first); a second signal raises KeyboardInterrupt at once.
    Yields the signals seen. Main thread only."""
    seen: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if seen:
            print(f"received {name} again: aborting at once", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(f"second {name}")
        seen.append(signum)
        print(f"received {name}: stopping after the current step with a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)
        board.request_stop.remote()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def save_run_recipe(recipe: Recipe) -> Path:
    """Write the recipe the run was started with to `run_dir/recipe.yaml` (read by `resume`)."""
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    path = recipe.run_dir / "recipe.yaml"
    raw = recipe.model_dump(mode="json")
    if recipe.data.datasets is not None:  # the cache entry is found again from the folders' files
        raw["data"]["shards"] = None
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_training(recipe: Recipe, *, show_progress: bool = True) -> TrainingResult:
    """Train a recipe on Ray and consolidate the last checkpoint into `output_dir/<name>.safetensors`.

    Re-running the same recipe (same run name and storage path) resumes from the newest valid
    checkpoint; invalid newer ones are set aside, each with a line saying why. SIGTERM/SIGUSR1/SIGINT
    stop the run after the current step with a checkpoint (`TrainingResult.preempted`); a second
    one raises KeyboardInterrupt at once. An embedded cluster is shut down before this returns or
    raises, whatever the outcome.

    Raises:
        ValueError: the run folder's checkpoints cannot be continued with this recipe, or W&B
            logging is asked for without a key or offline mode.
        ray.train.TrainingFailedError: a worker failed more often than `distributed.max_failures`.
        RuntimeError: training finished but left no valid checkpoint.
        KeyboardInterrupt: a second stop signal, or SIGINT before the job started.
    """
    if problem := wandb_problem(recipe):
        raise ValueError(problem)
    _, skipped = choose_checkpoint(recipe)  # refuse early (recipe changed, ZeRO stage changed), before any write
    check_data_fits_model(recipe, ShardIndex.load(recipe.data.shards))
    for line in set_aside_skipped(skipped):
        say(line)
    embedded = starts_embedded_cluster(recipe.distributed.address)
    with embedded_train_env(embedded):
        result, signals = _fit_on_ray(recipe, embedded, show_progress)
    # Ray's last reported checkpoint, by name in our run folder (Ray may spell the path otherwise)
    last = recipe.run_dir / Path(result.checkpoint.path).name if result.checkpoint else None
    return finish_run(recipe, last, stopped_early=bool(signals))


def _fit_on_ray(recipe: Recipe, embedded: bool, show_progress: bool) -> tuple[ray.train.Result, list[int]]:
    """Join or start the cluster, run the job, end an `embedded` cluster whatever happens; returns
    Ray's result and the stop signals seen."""
    try:
        init_ray(recipe.distributed.address, recipe.distributed.num_workers * recipe.distributed.cpus_per_worker)
        save_run_recipe(recipe)
        forget_ray_run_snapshot(recipe.run_dir)
        # On the driver's node: a lost worker node must not take the progress board (and the stop
        # flag) with it while Ray restarts the worker group.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        board = ProgressBoard.options(scheduling_strategy=here).remote()
        trainer = build_trainer(recipe, board)
        with stop_on_signals(board) as signals, ProgressDisplay(board, recipe.train.max_steps,
                                                                enabled=show_progress):
            result = fit_off_the_main_thread(trainer)
    finally:
        if embedded:  # also when ray.init itself was interrupted half way
            ray.shutdown(wait_for_processes=True)
    return result, signals
