"""`difftrain-dist checkpoints RUN_DIR`: list a run's checkpoints and whether each is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from difftrain_dist.launcher.common import console


def checkpoints(
    run_dir: Annotated[Path, typer.Argument(help="The run folder: `<storage_path>/<run name>`.")],
) -> None:
    """List checkpoints: step, valid or why not, size, loss."""
    from difftrain_dist.distrib.checkpoint import list_checkpoints

    if not run_dir.is_dir():
        console.print(f"[red]error:[/red] no such run folder: {run_dir}")
        raise typer.Exit(2)
    infos = list_checkpoints(run_dir)
    if not infos:
        console.print(f"no checkpoints in {run_dir}")
        raise typer.Exit(1)
    table = Table("step", "status", "size", "loss", "world size", "folder")
    for info in infos:
        status = "[green]valid[/green]" if info.valid else f"[red]invalid[/red]: {info.reason}"
        loss = "-" if info.loss is None else f"{info.loss:.4f}"
        table.add_row(str(info.step), status, f"{info.size_bytes / 2**20:.1f} MiB", loss,
                      str(info.world_size or "-"), info.path.name)
    console.print(table)
    for folder in sorted(run_dir.glob("checkpoint_*.invalid-*")):
        console.print(f"set aside (invalid when a run resumed, kept for inspection): {folder.name}")
