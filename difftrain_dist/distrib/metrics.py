"""Step metrics: when rank 0 reports them, and what (loss, samples/s, ETA, lr)."""

from __future__ import annotations

import time

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


class MetricsReporter:
    """Rank 0 sends `{"step", "max_steps", "loss", "samples_per_s", "eta_s", "lr"}` to the session
    every `train.log_every_n_steps` optimizer steps and at the last one; other ranks send nothing."""

    def __init__(self, recipe: Recipe, session, global_rank: int, world_size: int, start_step: int):
        train = recipe.train
        self.session, self.enabled = session, global_rank == 0
        self.every, self.max_steps = train.log_every_n_steps, train.max_steps
        samples_per_step = recipe.data.micro_batch_size * train.gradient_accumulation_steps * world_size
        self.throughput = Throughput(samples_per_step, start_step)

    def after_step(self, step: int, loss: float, lr: float) -> None:
        """`loss`: the step's mean over ranks; `lr`: the learning rate the step used."""
        if not self.enabled or (step % self.every and step != self.max_steps):
            return
        rate, eta = self.throughput.measure(step, self.max_steps)
        self.session.log({"step": step, "max_steps": self.max_steps, "loss": loss,
                          "samples_per_s": rate, "eta_s": eta, "lr": lr})
