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
import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.base import BaseHTTPMiddleware

from difftrain_dist.ui import api, pages
from difftrain_dist.ui.board import Dashboard

TOKEN_COOKIE = "difftrain_token"
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no framing by another site (a click on Stop through an invisible frame)
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a ?token= URL never leaves in a Referer header
}


def is_loopback(host: str) -> bool:
    """`localhost`, or an IP address of the loopback interface (127.0.0.0/8, ::1; IPv6 in
    brackets too). Names that merely start like one (`127.0.0.1.example.com`) are not."""
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header value, without its port (`[::1]:8675` → `[::1]`)."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard(BaseHTTPMiddleware):
    """Token (or loopback Host) check on every request, and same-origin JSON for POSTs."""

    def __init__(self, app, token: str | None):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        if self.token is None:
            if not is_loopback(host_name(request.headers.get("host") or "")):
                return Response("this dashboard answers on the loopback interface only (no token set)", 403,
                                headers=SECURITY_HEADERS)
        else:
            given = _bearer(request) or request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token")
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return Response("token required: open the URL `difftrain-dist ui` printed (…/?token=…), or send "
                                "`Authorization: Bearer <token>`", 401)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return Response("cross-origin request refused", 403)
            media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return Response("POST a JSON body (Content-Type: application/json)", 415)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
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
