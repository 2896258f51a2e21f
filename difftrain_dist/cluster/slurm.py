"""`cluster slurm`: an sbatch script that runs a recipe on a Ray cluster spread over the allocation.

The script starts a Ray head on the first node and a Ray worker on every other one (`srun
--overlap`, one step per node), runs `difftrain-dist train` against it, stops Ray on every node
and exits with the run's status. Slurm sends USR1 `signal_seconds` before the time limit
(`--signal=B:USR1@…`); the script passes it on to the driver, which finishes the step, saves a
checkpoint and exits 75, and the script then requeues the job (`scontrol requeue`). The requeued
job runs the same recipe under the same `run.name` and `run.storage_path`, so it resumes from the
checkpoint. SIGTERM (preemption) is passed on the same way.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from difftrain_dist.cluster.templates import render_template
from difftrain_dist.config import Recipe

_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SlurmOptions:
    """The allocation: Slurm's own names and units."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int = 16
    time: str = "24:00:00"
    """Time limit, Slurm's format (`[D-]HH:MM:SS`)."""
    signal_seconds: int = 300
    """How long before the time limit Slurm sends USR1 (s): enough to finish a step and save."""
    partition: str | None = None
    account: str | None = None
    log_dir: str = "slurm-logs"
    ray_port: int = 6379

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_node < 1:
            raise ValueError("--nodes and --cpus-per-node must be >= 1, --gpus-per-node >= 0")
        if not _TIME.match(self.time):
            raise ValueError(f"--time: {self.time!r} is not a Slurm time limit like 24:00:00 or 2-00:00:00")
        if self.signal_seconds < 10:
            raise ValueError("--signal-seconds: give the run at least 10 s to save a checkpoint")
        for name, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and not _NAME.match(value):
                raise ValueError(f"{name}: {value!r} is not a Slurm name")

    @property
    def workers(self) -> int:
        """Training workers: one per GPU, or one per node on CPU-only allocations."""
        return self.nodes * max(self.gpus_per_node, 1)


def sbatch_script(recipe: Recipe, recipe_path: Path, options: SlurmOptions) -> str:
    """The sbatch script (bash) for `recipe`, read from `recipe_path` on the cluster.

    The training command fixes `run.name` and the worker count (`nodes × gpus_per_node`, one per
    GPU) with `--set`, so every requeue resumes the same run. `$DIFFTRAIN_PYTHON` (default
    `python`) and `$RAY` (default `ray`) select the interpreter and Ray CLI on the nodes.
    """
    o = options
    name = recipe.run.name
    gpu = o.gpus_per_node > 0
    cpus_per_worker = max(1, o.cpus_per_node // max(o.gpus_per_node, 1) - 1)
    sbatch = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={o.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={o.cpus_per_node}",
        *([f"#SBATCH --gpus-per-node={o.gpus_per_node}"] if gpu else []),
        f"#SBATCH --time={o.time}",
        f"#SBATCH --signal=B:USR1@{o.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={o.log_dir}/%x-%j.out",
        *([f"#SBATCH --partition={o.partition}"] if o.partition else []),
        *([f"#SBATCH --account={o.account}"] if o.account else []),
    ]
    overrides = [
        f"run.name={name}",
        f"distributed.num_workers={o.workers}",
        f"distributed.use_gpu={'true' if gpu else 'false'}",
        f"distributed.cpus_per_worker={cpus_per_worker}",
    ]
    train = " ".join(
        ['"$PYTHON" -m difftrain_dist train "$RECIPE" --address "$HEAD_IP:$PORT" --no-progress',
         *(f"--set {shlex.quote(item)}" for item in overrides)]
    )
    return render_template("sbatch.sh", name=name, sbatch_lines="\n".join(sbatch), recipe=shlex.quote(str(recipe_path)),
                           log_dir=shlex.quote(o.log_dir), port=str(o.ray_port), gpus_per_node=str(o.gpus_per_node),
                           train=train)
