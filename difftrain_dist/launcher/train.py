"""`difftrain-dist train RECIPE` and `difftrain-dist resume RUN_DIR`: run a recipe on Ray Train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.config import Recipe, load_recipe
from difftrain_dist.launcher.common import EXIT_PREEMPTED, console, interruptions, training_errors, user_errors

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field, e.g. --set train.lr=2e-4 (repeatable)."),
]
AddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local one).")
]
ProgressOption = Annotated[bool, typer.Option(help="Show live step / loss / samples/s / ETA.")]
VerboseOption = Annotated[bool, typer.Option(
    "--verbose", help="Show Ray's and the workers' own output here too (it always goes to Ray's log files), "
                      "with the libraries' own verbosity and progress bars (embedded runs).")]


def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see configs/).")],
    set_: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
    verbose: VerboseOption = False,
) -> None:
    """Train a LoRA; the file ends up in `<run.output_dir>/<run.name>.safetensors`.

    Re-running with the same run name and storage path resumes from the newest valid checkpoint.
    Ctrl+C (SIGINT), SIGTERM or SIGUSR1 stop after the current step with a checkpoint and exit with
    status 75; a second one aborts at once (status 130).
    """
    overrides = list(set_ or [])
    if address:
        overrides.append(f"distributed.address={address}")
    with user_errors():
        cfg = load_recipe(recipe, overrides)
    run(cfg, progress, verbose)


def resume(
    run_dir: Annotated[Path, typer.Argument(help="The run folder: `<storage_path>/<run name>`.")],
    set_: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
    verbose: VerboseOption = False,
) -> None:
    """Continue a run from its newest valid checkpoint with the recipe it was started with
    (`RUN_DIR/recipe.yaml`); `--set` may change e.g. train.max_steps or distributed.num_workers."""
    run_dir = run_dir.resolve()
    overrides = list(set_ or [])
    if address:
        overrides.append(f"distributed.address={address}")
    with user_errors():
        if not (run_dir / "recipe.yaml").is_file():
            raise ValueError(f"{run_dir} has no recipe.yaml: is it a run folder made by `difftrain-dist train`?")
        if any(o.split("=", 1)[0].strip() in ("run.name", "run.storage_path") for o in overrides):
            raise ValueError("resume continues RUN_DIR itself: run.name and run.storage_path cannot be --set")
        cfg = load_recipe(run_dir / "recipe.yaml", overrides,
                          replace={"run.storage_path": str(run_dir.parent), "run.name": run_dir.name})
    run(cfg, progress, verbose)


def run(cfg: Recipe, progress: bool, verbose: bool = False) -> None:
    """Run a validated recipe and report the result; exit 75 when stopped by a signal, 130 when
    aborted by a second one. While it runs this process is the run's driver (`RUN/driver.json`,
    which also records how it ended)."""
    from difftrain_dist.distrib.driver.launch import run_training
    from difftrain_dist.distrib.driver.record import driving

    aborted = (f"the step in flight was not saved; run the same command again or "
               f"`difftrain-dist resume {cfg.run_dir}` to continue from the last checkpoint")
    with user_errors(), training_errors(), interruptions(aborted), driving(cfg.run_dir,
                                                                          cfg.distributed.address) as record:
        if cfg.data.datasets is not None:  # the shard writer's stack is imported only to build
            from difftrain_dist.distrib.driver.datasets import build_datasets

            build_datasets(cfg)
        console.print(
            f"run [bold]{cfg.run.name}[/bold]: {cfg.distributed.num_workers} worker(s), "
            f"ZeRO-{cfg.distributed.zero_stage}, {cfg.train.max_steps} steps, checkpoints in {cfg.run_dir}"
        )
        result = run_training(cfg, show_progress=progress, verbose=verbose)
        record.step = result.step
        if result.preempted:
            record.outcome, record.reason = "stopped", f"stopped by a signal at step {result.step}"
        else:
            record.outcome = "finished"
    if result.preempted:
        console.print(f"[yellow]stopped at step {result.step} of {cfg.train.max_steps}[/yellow] "
                      f"(latest LoRA: {result.lora_path}); run the same command again or "
                      f"`difftrain-dist resume {cfg.run_dir}` to continue")
        raise typer.Exit(EXIT_PREEMPTED)
    console.print(f"LoRA written: [bold]{result.lora_path}[/bold] (step {result.step}, from {result.checkpoint})")
