"""The dashboard served on loopback in a thread of the test process (real uvicorn, real sockets)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from difftrain_dist.ui.server import create_app

from .procs import free_port


@contextlib.contextmanager
def serve(runs: Path, *, token: str | None = None, cwd: Path | None = None,
          data_dirs: list[Path] | None = None) -> Iterator[str]:
    """Serve a dashboard over `runs` on 127.0.0.1; yields its base URL ("http://127.0.0.1:PORT")."""
    port = free_port()
    app = create_app(runs, token=token, cwd=cwd, data_dirs=data_dirs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client-side normalisation of "..", "%2e" or "//", which
    HTTP libraries do and an attacker's client does not). Returns (status, body)."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {where.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
