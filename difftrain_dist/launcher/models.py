"""`difftrain-dist models init-tiny ARCH OUT`: tiny random models for tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors
from difftrain_dist.models.families import TINY_VARIANTS as TINY_ARCHS

app = typer.Typer(help="Model utilities.", no_args_is_help=True, rich_markup_mode="markdown")


@app.command("init-tiny")
def init_tiny(
    arch: Annotated[
        str,
        typer.Argument(
            help=f"Architecture: one of {', '.join(TINY_ARCHS)} (flux is FLUX.1-dev, flux-schnell FLUX.1-schnell)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Folder to save the diffusers pipeline into.")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Save a tiny random-weight pipeline of ARCH in diffusers format (nothing is downloaded)."""
    from difftrain_dist.models import init_tiny as build

    with user_errors():
        path = build(arch, out, seed=seed)
    console.print(f"tiny {arch} pipeline saved to {path}")
