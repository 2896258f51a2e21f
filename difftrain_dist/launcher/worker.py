"""`difftrain-dist worker RECIPE`: the train loop in this process, for torchrun/srun launches."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.config import load_recipe
from difftrain_dist.launcher.common import EXIT_PREEMPTED, console, user_errors


def worker(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field (repeatable).")] = None,
) -> None:
    """Run one rank of the job without Ray, e.g. `torchrun --nproc-per-node 8 -m difftrain_dist worker r.yaml`
    or under `srun`. Rank 0 writes the LoRA file at the end, and is the run's driver while it runs
    (`RUN/driver.json`)."""
    from difftrain_dist.distrib.driver.local_launch import run_local_worker
    from difftrain_dist.distrib.driver.record import driving

    with user_errors():
        cfg = load_recipe(recipe, list(set_ or []))
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        with driving(cfg.run_dir, None) if rank == "0" else contextlib.nullcontext() as record:
            path, stopped_early = run_local_worker(cfg)
            if record is not None:
                record.outcome = "stopped" if stopped_early else "finished"
    if stopped_early:
        if path is not None:
            console.print(f"[yellow]stopped before train.max_steps[/yellow] (latest LoRA: {path}); "
                          "run again to continue")
        raise typer.Exit(EXIT_PREEMPTED)
    if path is not None:
        console.print(f"LoRA written: [bold]{path}[/bold]")
