"""`difftrain-dist export CKPT`: consolidate a checkpoint into a LoRA file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A `checkpoint_<step>` folder of a run.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .safetensors file to write.")],
    format: Annotated[
        str, typer.Option("--format", help="diffusers (default) or kohya (ComfyUI, A1111).")
    ] = "diffusers",
) -> None:
    """Consolidate a checkpoint's DeepSpeed shards into one safetensors LoRA file."""
    from difftrain_dist.distrib.export import export_checkpoint

    with user_errors():
        path = export_checkpoint(checkpoint, output, fmt=format)
    console.print(f"wrote {path}")
