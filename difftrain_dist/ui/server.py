"""The dashboard's web server (FastAPI): pages (pages.py), a JSON API (api.py) and file routes
over a runs folder (board.py).

Every route, pages, API, images, downloads and static files alike, passes :class:`Guard`: with a
token, a request must carry it (`Authorization: Bearer`, the `difftrain_token` cookie, or
`?token=` once, which sets the cookie); without one (loopback only) the Host header must name
the loopback interface, so that a web page elsewhere cannot reach the dashboard through DNS
rebinding. POSTs take JSON only and refuse another Origin. File routes serve files inside a run
folder or a known shard folder, nothing else (resolved paths, symbolic links included).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.base import BaseHTTPMiddleware

from difftrain_dist.ui import api, pages
from difftrain_dist.ui.board import Dashboard

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
TOKEN_COOKIE = "difftrain_token"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


class Guard(BaseHTTPMiddleware):
    """Token (or loopback Host) check on every request, and same-origin JSON for POSTs."""

    def __init__(self, app, token: str | None):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        if self.token is None:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                return Response("this dashboard answers on the loopback interface only (no token set)", 403)
        else:
            given = _bearer(request) or request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token")
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return Response("token required: open the URL `difftrain-dist ui` printed (…/?token=…), or send "
                                "`Authorization: Bearer <token>`", 401)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return Response("cross-origin request refused", 403)
            if not (request.headers.get("content-type") or "").startswith("application/json"):
                return Response("POST a JSON body (Content-Type: application/json)", 415)
        response = await call_next(request)
        if self.token is not None and request.query_params.get("token") == self.token:
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _bearer(request: Request) -> str | None:
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def create_app(runs_dir: Path, *, token: str | None = None, data_dirs: list[Path] | None = None,
               cwd: Path | None = None) -> FastAPI:
    """The dashboard over `runs_dir`. `token`: required on every request when set (`difftrain-dist
    ui` sets one for any bind address but loopback). `data_dirs`: more shard folders for the
    Datasets page. `cwd`: where started runs resolve their recipes' relative paths (default: the
    dashboard's own working directory)."""
    app = FastAPI(title="difftrain-dist", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.board = Dashboard(runs_dir, data_dirs, cwd)
    app.add_middleware(Guard, token=token)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    return app
