"""The `difftrain-dist` command line: one thin module per verb."""

from __future__ import annotations

import typer

from difftrain_dist.cluster.secrets import DEFAULT_ENV_FILE, load_env_file
from difftrain_dist.launcher import (
    checkpoints,
    cluster,
    export,
    models,
    plot,
    recipe,
    sample,
    shards,
    train,
    ui,
    worker,
)
from difftrain_dist.launcher.common import user_errors
from difftrain_dist.quiet import apply_quiet_env, quiet_deepspeed_cpu_notice

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
app.command("plot")(plot.plot)
app.command("ui")(ui.ui)
app.command("worker")(worker.worker)
app.add_typer(shards.app, name="shards")
app.add_typer(models.app, name="models")
app.add_typer(recipe.app, name="recipe")
app.command("submit")(cluster.submit)
app.add_typer(cluster.jobs_app, name="jobs")
app.add_typer(cluster.cluster_app, name="cluster")


def main() -> None:
    """Console-script entry point. Secrets in ./.env are loaded into the environment first (as
    ai-toolkit does; variables already set win), so local runs and their workers see them."""
    apply_quiet_env()
    quiet_deepspeed_cpu_notice()
    with user_errors():
        load_env_file(DEFAULT_ENV_FILE)
    app()
