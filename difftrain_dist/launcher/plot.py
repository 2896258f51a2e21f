"""`difftrain-dist plot RUN_DIR`: draw a run's loss curve from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors


def plot(
    run_dir: Annotated[Path, typer.Argument(help="The run folder: `<storage_path>/<run name>`.")],
    out: Annotated[Path | None, typer.Option("--out", help="PNG to write (default: RUN_DIR/loss.png).")] = None,
    smoothing: Annotated[float, typer.Option(help="EMA weight of the smoothed line, in [0, 1).")] = 0.9,
) -> None:
    """Draw RUN_DIR/loss.png: the loss of every step, a smoothed line, the lr on a second axis.
    Works while the run trains (it reads the steps written so far)."""
    from difftrain_dist.distrib.lossplot import plot_loss

    with user_errors():
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir}: no such run folder")
        written = plot_loss(run_dir, out, smoothing=smoothing)
    console.print(f"loss plot: [bold]{written}[/bold]")
