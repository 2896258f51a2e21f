"""`difftrain-dist shards build SRC OUT`: a folder of images + captions → WebDataset shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors

app = typer.Typer(help="Build WebDataset shards from image folders.", no_args_is_help=True, rich_markup_mode="markdown")


@app.command("build")
def build(
    src: Annotated[Path, typer.Argument(help="Folder of images with same-stem caption files.")],
    out: Annotated[Path, typer.Argument(help="Empty (or new) folder for shard-*.tar and index.json.")],
    resolution: Annotated[int, typer.Option(help="Training resolution in pixels (square side).")] = 512,
    caption_ext: Annotated[str, typer.Option(help="Caption file extension.")] = ".txt",
    default_caption: Annotated[
        str | None, typer.Option(help="Caption for images without a caption file (default: skip them).")
    ] = None,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
) -> None:
    """Write OUT/shard-%06d.tar and OUT/index.json; bad inputs are skipped and reported."""
    from difftrain_dist.data_shards import build_shards

    with user_errors():
        index = build_shards(src, out, resolution=resolution, caption_ext=caption_ext,
                             default_caption=default_caption, samples_per_shard=samples_per_shard)
    console.print(f"{index.num_samples} samples in {len(index.shards)} shard(s) → {out}")
    for item in index.skipped:
        console.print(f"  [yellow]skipped[/yellow] {item['source']}: {item['reason']}")
