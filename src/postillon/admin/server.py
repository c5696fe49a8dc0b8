"""The admin HTTP server: an aiohttp application in the MTA's event loop.

``build_app(context)`` returns the application; other parts add their routes
to it before it starts, e.g. (observability) ::

    app = build_app(context)
    app.router.add_get("/metrics", metrics_handler)
    make_public(app, "/metrics")   # only if it should need no token

Every route needs ``Authorization: Bearer <token>`` unless its path is in the
public set: ``/healthz`` and the web page's own static files (they hold no
data; the page asks for the token and sends it with each API call). Without
cookies there is nothing for another site to forge (no CSRF).
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Final

from aiohttp import web

from postillon import __version__
from postillon.admin import api
from postillon.admin.context import CONTEXT, AdminContext, json_error
from postillon.config.model import split_host_port

log = logging.getLogger("postillon.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


PUBLIC_PATHS: Final = web.AppKey("postillon_admin_public_paths", set[str])
STATIC_PREFIX: Final = "/static/"

# The page loads nothing from elsewhere and nobody may frame it.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def make_public(app: web.Application, path: str) -> None:
    """Let ``path`` be fetched without a token (health checks, a metrics scraper)."""
    app[PUBLIC_PATHS].add(path)


@functools.cache
def static_dir() -> Path:
    """Where the page's files are (found once: the lookup imports parts of the standard
    library, which must happen before the server drops privileges)."""
    return Path(str(resources.files("postillon.admin") / "static"))


def _is_public(app: web.Application, path: str) -> bool:
    return path in app[PUBLIC_PATHS] or path.startswith(STATIC_PREFIX)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, JSON errors, and no 500 with details for anyone."""
    app = request.app
    response: web.StreamResponse
    try:
        if not _is_public(app, request.path):
            verifier = app[CONTEXT].token
            if not verifier.check(_bearer(request)):
                why = (
                    "missing or wrong token (send Authorization: Bearer <token>)"
                    if verifier.configured
                    else "no admin token yet: run `postillon admin token` on the server"
                )
                response = json_error(401, why)
                response.headers["WWW-Authenticate"] = 'Bearer realm="postillon"'
                return response
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.path)
        response = json_error(500, "internal error (details in the server log)")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def healthz(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    health = context.queue_health()
    # A failing certificate renewal is reported, not a 503: the server still takes mail
    # with the certificate it has, and a load balancer must not pull it for that.
    certificate = context.certificate_status()
    extra: dict[str, object] = {} if certificate is None else {"certificate": certificate}
    if certificate is not None and certificate.get("state") == "failing":
        extra["warnings"] = [f"certificate renewal failing: {certificate.get('last_error')}"]
    if not health.ok:
        return web.json_response(
            {"status": "queue unavailable", "reason": health.reason, "version": __version__}
            | extra,
            status=503,
        )
    return web.json_response({"status": "ok", "version": __version__} | extra)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(static_dir() / "index.html")


def build_app(context: AdminContext) -> web.Application:
    # 1 MiB of request body is plenty: the API takes no uploads.
    app = web.Application(middlewares=[_guard], client_max_size=1024 * 1024)
    app[CONTEXT] = context
    app[PUBLIC_PATHS] = {"/healthz", "/", "/favicon.ico"}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    app.router.add_static(STATIC_PREFIX, static_dir(), follow_symlinks=False)
    api.add_routes(app)
    return app


class AdminServer:
    """Runs the application on ``listen`` (optionally with TLS) until stopped."""

    def __init__(self, app: web.Application, listen: str, tls: ssl.SSLContext | None) -> None:
        self.app = app
        self.listen = listen
        self.tls = tls
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.tls, reuse_address=True)
        await site.start()
        bound = self._runner.addresses
        self.port = int(bound[0][1]) if bound else port
        scheme = "https" if self.tls else "http"
        log.info("admin server on %s://%s", scheme, self.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
