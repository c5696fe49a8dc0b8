"""``postillon queue sts`` shows the MTA-STS policies cached in the queue store (the cache
a server process wrote there, read by another process)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from postillon.core.sts import CachedPolicy, StsPolicy
from postillon.queue.sqlite_store import SqliteStore
from support.server import ServerProcess

pytestmark = pytest.mark.integration


def test_queue_sts_lists_cached_policies(make_server: Any) -> None:
    server: ServerProcess = make_server()
    server.write_config()
    path = server.data_dir / "queue" / "queue.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()

    async def fill() -> None:
        store = SqliteStore(path)
        policy = StsPolicy("enforce", 86400, ("mx.example.net", "*.mx.example.net"))
        await store.save_sts_policy(CachedPolicy("example.net", "id2", policy, now, now))
        old = StsPolicy("testing", 60, ("mx.old.example",))
        await store.save_sts_policy(
            CachedPolicy("old.example", "x", old, now - 600, now, "HTTP 404 Not Found")
        )
        await store.close()

    asyncio.run(fill())
    out = server.cli("queue", "sts").stdout
    assert "example.net: mode enforce, mx mx.example.net, *.mx.example.net, id id2" in out, out
    assert "old.example: mode testing" in out and "expired" in out
    assert "last refresh failed" in out and "HTTP 404 Not Found" in out
    [row] = json.loads(server.cli("queue", "sts", "EXAMPLE.net", "--json").stdout)
    assert row["mode"] == "enforce" and row["expires_at"] == now + 86400 and not row["expired"]
    assert (
        "no MTA-STS policy cached for nowhere.test"
        in server.cli("queue", "sts", "nowhere.test").stdout
    )
