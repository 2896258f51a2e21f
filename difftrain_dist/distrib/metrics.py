"""Step metrics: when rank 0 reports them, and what (loss, samples/s, ETA, lr); the run's
`metrics.jsonl`, one line per optimizer step."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from difftrain_dist.config import Recipe


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (getrusage; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Samples/s and ETA over the steps since the last report."""

    def __init__(self, samples_per_step: int, start_step: int):
        self.samples_per_step = samples_per_step
        self.last_time, self.last_step = time.perf_counter(), start_step

    def measure(self, step: int, max_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        rate = steps * self.samples_per_step / max(now - self.last_time, 1e-9)
        eta = (max_steps - step) * self.samples_per_step / max(rate, 1e-9)
        self.last_time, self.last_step = now, step
        return rate, eta


METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """`run_dir/metrics.jsonl`: one JSON object per optimizer step, in step order::

        {"step": 12, "loss": 0.118, "lr": 0.0001, "samples_per_s": 31.2, "grad_norm": 0.42,
         "step_time_s": 0.064, "wall_time": 1764450000.0, "world_size": 2}

    (`grad_norm`: the norm before clipping, null where DeepSpeed does not compute it;
    `step_time_s`: wall time since the previous step's line, a save or sample grid included;
    `samples_per_s`: the step's samples over all ranks / step_time_s; `wall_time`: Unix time, s.)
    Each line is flushed as it is written; the file is fsynced before each checkpoint is saved. A
    run that continues from step N keeps the lines of steps 1..N and drops the rest (steps trained
    after the checkpoint it resumes from, and a line cut by a crash), so the file holds every step
    once, however often the run stopped.
    """

    def __init__(self, run_dir: Path, start_step: int):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _lines_up_to(self.path, start_step)
        tmp = self.path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)

    def write(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint that covers them)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The whole lines of `path` with steps 1..`step`, in order (a torn last line is dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] == len(kept) + 1 <= step:
            kept.append(line)
    return kept


def read_metrics(run_dir: Path) -> list[dict]:
    """The entries of `run_dir/metrics.jsonl` (see MetricsFile), [] when there is none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "lr", "samples_per_s", "grad_norm", "step_time_s")
"""metrics.jsonl fields that also go to TensorBoard, as `train/<field>`."""


class TensorBoardLog:
    """TensorBoard event files in `run_dir/tensorboard/` (tensorboardX's SummaryWriter), written
    with `purge_step` = the first step of this session: TensorBoard then hides what an earlier
    session logged from that step on, so a resumed run shows each step once, as metrics.jsonl."""

    def __init__(self, run_dir: Path, start_step: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1,
                                    flush_secs=30)

    def write(self, entry: dict) -> None:
        for name in SCALARS:
            if entry.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", entry[name], entry["step"], walltime=entry["wall_time"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR")
"""Environment variables W&B reads that the driver passes on to the training workers."""
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")


def wandb_problem(recipe: Recipe, env: dict[str, str] | None = None) -> str | None:
    """Why `logging.wandb` cannot work in this environment, or None (not asked, or it can)."""
    env = os.environ if env is None else env
    if not recipe.logging.wandb or env.get("WANDB_API_KEY") or env.get("WANDB_MODE") in WANDB_LOCAL_MODES:
        return None
    return ("logging.wandb is true but WANDB_API_KEY is not set: put it in the environment or in .env, "
            "or set WANDB_MODE=offline to keep the W&B run under the run folder without network")


def wandb_run_id(recipe: Recipe) -> str:
    """The W&B run id of a run: the same for every session of it (resume continues the W&B run)."""
    return f"{recipe.run.name}-{recipe.recipe_hash()[:8]}"


class WandbLog:
    """A Weights & Biases run (`wandb.init(resume="allow")` under `run_dir/wandb/`), keyed by
    :func:`wandb_run_id` and logged with `step=` the optimizer step, as `train/<field>` like the
    TensorBoard scalars. W&B keeps the first value it received for a step: the steps a resumed
    run trains again (after the checkpoint, before the stop) keep their first session's values
    there, while metrics.jsonl and TensorBoard show the new ones."""

    def __init__(self, recipe: Recipe, start_step: int):
        import wandb

        self.start_step = start_step
        self.run = wandb.init(
            project=recipe.logging.wandb_project, entity=recipe.logging.wandb_entity, name=recipe.run.name,
            id=wandb_run_id(recipe), resume="allow", dir=str(recipe.run_dir),
            config=recipe.model_dump(mode="json"),
        )

    def write(self, entry: dict) -> None:
        values = {f"train/{name}": entry[name] for name in SCALARS if entry.get(name) is not None}
        if entry["step"] >= (self.run.step or 0):
            self.run.log(values, step=entry["step"])

    def close(self) -> None:
        self.run.finish()


class MetricsReporter:
    """Rank 0 writes every step to `metrics.jsonl` (MetricsFile), TensorBoard (TensorBoardLog) and,
    when the recipe asks, W&B (WandbLog), and sends
    `{"step", "max_steps", "loss", "samples_per_s", "eta_s", "lr"}` to the session every
    `train.log_every_n_steps` optimizer steps and at the last one; other ranks do neither."""

    def __init__(self, recipe: Recipe, session, global_rank: int, world_size: int, start_step: int):
        train = recipe.train
        self.session, self.enabled, self.world_size = session, global_rank == 0, world_size
        self.every, self.max_steps = train.log_every_n_steps, train.max_steps
        self.samples_per_step = recipe.data.micro_batch_size * train.gradient_accumulation_steps * world_size
        self.throughput = Throughput(self.samples_per_step, start_step)
        self.file = MetricsFile(recipe.run_dir, start_step) if self.enabled else None
        self.tensorboard = TensorBoardLog(recipe.run_dir, start_step) if self.enabled else None
        self.wandb = WandbLog(recipe, start_step) if self.enabled and recipe.logging.wandb else None
        self.last_time = time.perf_counter()

    def after_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> None:
        """`loss`: the step's mean over ranks; `lr`: the learning rate the step used;
        `grad_norm`: the gradients' global norm before clipping, when known."""
        if not self.enabled:
            return
        now = time.perf_counter()
        step_time, self.last_time = now - self.last_time, now
        norm = None if grad_norm is None or not math.isfinite(float(grad_norm)) else float(grad_norm)
        entry = {"step": step, "loss": loss, "lr": lr, "samples_per_s": self.samples_per_step / max(step_time, 1e-9),
                 "grad_norm": norm, "step_time_s": step_time, "wall_time": time.time(), "world_size": self.world_size}
        self.file.write(entry)
        self.tensorboard.write(entry)
        if self.wandb is not None:
            self.wandb.write(entry)
        if step % self.every and step != self.max_steps:
            return
        rate, eta = self.throughput.measure(step, self.max_steps)
        self.session.log({"step": step, "max_steps": self.max_steps, "loss": loss,
                          "samples_per_s": rate, "eta_s": eta, "lr": lr})

    def sync(self) -> None:
        """Before a checkpoint: the metrics of the steps it covers are on disk."""
        if self.file is not None:
            self.file.sync()
            self.tensorboard.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()
