"""`run_training`: a recipe from the CLI to its LoRA file, on the embedded local cluster (rank
actors, `embedded.py`) or on a Ray cluster it joins (Ray Train, `ray_job.py`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import ShardIndex
from difftrain_dist.distrib.checkpoint import choose_checkpoint, set_aside_skipped
from difftrain_dist.distrib.driver.finish import TrainingResult, finish_run
from difftrain_dist.distrib.driver.progress import say
from difftrain_dist.distrib.driver.ray_cluster import starts_embedded_cluster
from difftrain_dist.distrib.metrics import wandb_problem
from difftrain_dist.distrib.preflight import check_data_fits_model


def run_training(recipe: Recipe, *, show_progress: bool = True, verbose: bool = False) -> TrainingResult:
    """Train a recipe on Ray and consolidate the last checkpoint into `output_dir/<name>.safetensors`.

    Re-running the same recipe (same run name and storage path) resumes from the newest valid
    checkpoint; invalid newer ones are set aside, each with a line saying why. SIGTERM/SIGUSR1/SIGINT
    stop the run after the current step with a checkpoint (`TrainingResult.preempted`); a second
    one raises KeyboardInterrupt at once. An embedded cluster is shut down before this returns or
    raises, whatever the outcome; `verbose` shows its processes' own output (Ray's, DeepSpeed's)
    in this terminal instead of only in Ray's log files.

    Raises:
        ValueError: the run folder's checkpoints cannot be continued with this recipe, or W&B
            logging is asked for without a key or offline mode.
        embedded.WorkerGroupError, ray.train.TrainingFailedError: a worker failed more often than
            `distributed.max_failures`.
        RuntimeError: training finished but left no valid checkpoint.
        KeyboardInterrupt: a second stop signal, or SIGINT before the job started.
    """
    if problem := wandb_problem(recipe):
        raise ValueError(problem)
    _, skipped = choose_checkpoint(recipe)  # refuse early (recipe changed, ZeRO stage changed), before any write
    check_data_fits_model(recipe, ShardIndex.load(recipe.data.shards))
    for line in set_aside_skipped(skipped):
        say(line)
    if starts_embedded_cluster(recipe.distributed.address):
        from difftrain_dist.distrib.driver.embedded import run_embedded

        result, signals = run_embedded(recipe, show_progress=show_progress, verbose=verbose)
        if result is not None:
            return result
        # rank 0 could not say (nothing trained): the run folder's newest valid checkpoint
        return finish_run(recipe, None, stopped_early=signals)
    from difftrain_dist.distrib.driver.ray_job import run_on_cluster

    return run_on_cluster(recipe, show_progress=show_progress)


def save_run_recipe(recipe: Recipe) -> Path:
    """Write the recipe the run was started with to `run_dir/recipe.yaml` (read by `resume`)."""
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    path = recipe.run_dir / "recipe.yaml"
    raw = recipe.model_dump(mode="json")
    if recipe.data.datasets is not None:  # the cache entry is found again from the folders' files
        raw["data"]["shards"] = None
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
