"""`difftrain-dist export CKPT`: consolidate a checkpoint into a LoRA file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors
from difftrain_dist.models.families import FAMILIES

_DEFAULT_FORMATS = ", ".join(f"{f.lora_file_format} for {name}" for name, f in FAMILIES.items())


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A `checkpoint_<step>` folder of a run.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .safetensors file to write.")],
    format: Annotated[
        str | None,
        typer.Option("--format", help="kohya or diffusers; default: the one training writes for the "
                     f"architecture ({_DEFAULT_FORMATS}), which every client loads."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, float16 or bfloat16; default: the run's checkpoint.lora_dtype."),
    ] = None,
) -> None:
    """Consolidate a checkpoint's DeepSpeed shards into one safetensors LoRA file."""
    from difftrain_dist.distrib.export import export_checkpoint

    with user_errors():
        path = export_checkpoint(checkpoint, output, fmt=format, dtype=dtype)
    console.print(f"wrote {path}")
