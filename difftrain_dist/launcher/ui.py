"""`difftrain-dist ui`: the web dashboard over a folder of runs."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors

TOKEN_ENV = "DIFFTRAIN_UI_TOKEN"


def ui(
    runs: Annotated[Path, typer.Option("--runs", help="Folder of run folders (a recipe's run.storage_path).")] = (
        Path("runs")),
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback requires a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8675,
    token: Annotated[str | None, typer.Option(help=f"Access token (default: ${TOKEN_ENV}; one is made up and "
                                                   "printed when binding beyond loopback without one).")] = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="More shard folders (or folders of them) for "
                                                                  "the Datasets page (repeatable).")] = None,
) -> None:
    """Serve the dashboard: runs with live status, charts, samples, checkpoints and logs; start,
    stop and resume runs; datasets. Runs it starts keep running when it stops."""
    import uvicorn

    from difftrain_dist.ui.server import create_app, is_loopback

    token = token or os.environ.get(TOKEN_ENV) or None
    with user_errors():
        if runs.exists() and not runs.is_dir():
            raise ValueError(f"--runs: {runs} is a file, not a folder")
        if not is_loopback(host) and token is None:
            token = secrets.token_urlsafe(24)
        if not runs.exists():
            console.print(f"{runs} does not exist yet: made it (runs started here go there)")
        app = create_app(runs, token=token, data_dirs=list(data or []))
    shown = "localhost" if is_loopback(host) else socket.gethostname() if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"dashboard over [bold]{runs.resolve()}[/bold]: {url}")
    if token and not is_loopback(host):
        console.print("every request needs the token (the link above sets a cookie); keep the URL private: "
                      "this is plain HTTP, so the token crosses the network in clear (an SSH tunnel avoids that)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
