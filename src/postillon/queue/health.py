"""Watching a store's health: when to give up on it.

A store that cannot recover by itself (``StoreHealth.recoverable`` False: the
SQLite writer thread died) leaves the server alive but unable to keep mail:
every message would get a 451, every delivery would stall. The composition
root waits on ``wait_unrecoverable`` and then stops the server with a non-zero
exit status, so a supervisor (systemd ``Restart=on-failure``) starts a fresh
process on the same queue. A store that may recover (a PostgreSQL database
restarting) is only reported (``/healthz`` 503, ``421`` to new sessions).
"""

from __future__ import annotations

import asyncio

from postillon.queue.store import QueueStore, StoreHealth

CHECK_INTERVAL = 1.0
# Checks in a row that must find the store unrecoverable: /healthz shows the
# 503 for at least one interval before the process goes away.
CONFIRMATIONS = 2


async def wait_unrecoverable(
    store: QueueStore, interval: float = CHECK_INTERVAL, confirmations: int = CONFIRMATIONS
) -> StoreHealth:
    """The store's health once it was unrecoverable ``confirmations`` checks in a row."""
    seen = 0
    while True:
        health = store.health()
        seen = seen + 1 if not health.ok and not health.recoverable else 0
        if seen >= confirmations:
            return health
        await asyncio.sleep(interval)
