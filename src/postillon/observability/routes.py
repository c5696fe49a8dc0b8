"""The admin server's operations routes: ``GET /metrics`` (Prometheus text
exposition) and ``POST /api/reload`` (the same reload as SIGHUP, with its
result in the answer).

Both need the admin token like every admin route (Prometheus sends it with
``authorization: {credentials_file: ...}`` in its scrape config).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web

from postillon.observability.metrics import CONTENT_TYPE, Metrics


class ReloadOutcome(Protocol):
    """``app.ReloadResult``, as far as the route needs it."""

    @property
    def applied(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def restart_needed(self) -> Sequence[str]: ...


def add_ops_routes(
    app: web.Application,
    metrics: Metrics,
    reload: Callable[[], Awaitable[ReloadOutcome]],
) -> None:
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=await metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def reload_now(request: web.Request) -> web.Response:
        result = await reload()
        return web.json_response(
            {
                "applied": result.applied,
                "error": result.error or None,
                "restart_needed": list(result.restart_needed),
            },
            # 409: the request was fine, the new configuration was not.
            status=200 if result.applied else 409,
        )

    app.router.add_get("/metrics", scrape)
    app.router.add_post("/api/reload", reload_now)
