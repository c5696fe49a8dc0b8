"""What the admin routes work with: the context the composition root builds, the
application key it is stored under, and the JSON error body every route answers with.

A module of its own so that the routes (``api.py``) and the server that mounts them
(``server.py``) both import it and neither imports the other's importer: ``server``
imports ``api``, never the reverse.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from postillon.admin.queue_ops import QueueOps
from postillon.admin.token import TokenVerifier
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.listener import Listener
from postillon.queue.store import HEALTHY, StoreHealth


@dataclass
class AdminContext:
    """What the admin routes may read or act on (built by the composition root)."""

    ops: QueueOps
    token: TokenVerifier
    hostname: str
    listeners: Sequence[Listener] = ()
    limiter: ConnectionLimiter | None = None
    in_flight: Callable[[], int] = lambda: 0
    started_at: float = field(default_factory=time.time)
    # The queue store's health: /healthz answers 503 with the reason while the store
    # cannot take mail (a shared queue's database unreachable, the SQLite writer
    # gone), so a load balancer or supervisor acts on it.
    queue_health: Callable[[], StoreHealth] = lambda: HEALTHY
    # The ACME certificate's state ([tls] acme; None without it): /healthz, /api/status
    # and the page show a failing renewal while the old certificate is still served.
    certificate_status: Callable[[], dict[str, object] | None] = lambda: None
    # Writes the checks' buffered decisions (checks/trace.py) before an explain read.
    flush_trace: Callable[[], Awaitable[None]] | None = None
    # [tls_reports] enabled: outbound TLS sessions are counted in the store (the TLS
    # view's source); ``flush_tls`` writes the counts still in memory, so the view
    # shows the session that just ended.
    tls_counting: bool = False
    flush_tls: Callable[[], Awaitable[None]] | None = None


CONTEXT: Final = web.AppKey("postillon_admin_context", AdminContext)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
