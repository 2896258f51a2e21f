"""`difftrain-dist recipe convert JOB`: an ai-toolkit job file as the native recipe it means."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors

app = typer.Typer(help="Recipes: read other trainers' job files.", no_args_is_help=True)


@app.command("convert")
def convert(
    job: Annotated[Path, typer.Argument(help="An ai-toolkit job file (`job: extension`, process type sd_trainer).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Print the native recipe an ai-toolkit job means, a comment on each field naming the job key
    it comes from; `difftrain-dist train JOB` runs the same recipe."""
    from difftrain_dist.config.aitoolkit import convert_job, is_aitoolkit_job, render_recipe
    from difftrain_dist.config.load import read_recipe_file

    with user_errors():
        raw = read_recipe_file(job)
        if not is_aitoolkit_job(raw):
            raise ValueError(f"{job}: not an ai-toolkit job (no top-level `job` and `config`); "
                             "a native recipe needs no conversion")
        text = render_recipe(convert_job(raw, str(job)), str(job))
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {output}")
