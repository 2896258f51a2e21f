"""The `difftrain-dist` command line: one thin module per verb."""

from __future__ import annotations

import typer

from difftrain_dist.launcher import checkpoints, export, models, sample, shards, train, worker
from difftrain_dist.quiet import apply_quiet_env

app = typer.Typer(
    name="difftrain-dist",
    help="Distributed LoRA training for diffusion models on Ray Train and DeepSpeed ZeRO.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
app.command("train")(train.train)
app.command("resume")(train.resume)
app.command("export")(export.export)
app.command("checkpoints")(checkpoints.checkpoints)
app.command("sample")(sample.sample)
app.command("worker")(worker.worker)
app.add_typer(shards.app, name="shards")
app.add_typer(models.app, name="models")


def main() -> None:
    """Console-script entry point."""
    apply_quiet_env()
    app()
