"""`difftrain-dist train RECIPE`: validate a recipe and run it on Ray Train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.config import load_recipe
from difftrain_dist.launcher.common import console, user_errors


def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see configs/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field, e.g. --set train.lr=2e-4 (repeatable)."),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local one).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show live step / loss / samples/s / ETA.")] = True,
) -> None:
    """Train a LoRA. Re-running with the same run name and storage path resumes from the newest
    valid checkpoint; the LoRA ends up in `<run.output_dir>/<run.name>.safetensors`."""
    overrides = list(set_ or [])
    if address:
        overrides.append(f"distributed.address={address}")
    with user_errors():
        cfg = load_recipe(recipe, overrides)
    from difftrain_dist.distrib.ray_job import run_training

    console.print(
        f"run [bold]{cfg.run.name}[/bold]: {cfg.distributed.num_workers} worker(s), "
        f"ZeRO-{cfg.distributed.zero_stage}, {cfg.train.max_steps} steps, checkpoints in {cfg.run_dir}"
    )
    with user_errors():
        result = run_training(cfg, show_progress=progress)
    console.print(f"LoRA written: [bold]{result.lora_path}[/bold] (step {result.step}, from {result.checkpoint})")
