"""The idle pool of milter connections (checks/milter_pool.py): bounded, most recent
first, dead connections skipped, idle ones closed after the idle timeout."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from postillon.checks.milter_pool import MilterPool


class FakeConnection:
    def __init__(self, *, reusable: bool = True, alive: bool = True) -> None:
        self.can_be_reused = reusable
        self.alive = alive
        self.closed = False

    def still_open_while_idle(self) -> bool:
        return self.alive

    def close_idle(self) -> None:
        self.closed = True


def fake(**kw: Any) -> Any:
    return cast(Any, FakeConnection(**kw))


async def test_bounded_most_recent_first_and_only_reusable() -> None:
    pool = MilterPool(size=2, idle_timeout=60)
    first, second, third = fake(), fake(), fake()
    assert not pool.put(fake(reusable=False))
    assert pool.put(first) and pool.put(second)
    assert not pool.put(third)  # full: the caller closes it
    assert pool.take() is second
    assert pool.take() is first
    assert pool.take() is None
    assert pool.reused == 2


async def test_dead_idle_connections_are_skipped_and_closed() -> None:
    pool = MilterPool(size=4, idle_timeout=60)
    good, dead = fake(), fake()
    pool.put(good)
    pool.put(dead)
    dead.alive = False  # the milter closed it while it idled
    assert pool.take() is good
    assert dead.closed and not good.closed


async def test_idle_timeout_closes() -> None:
    pool = MilterPool(size=4, idle_timeout=0.05)
    conn = fake()
    pool.put(conn)
    await asyncio.sleep(0.2)
    assert conn.closed and len(pool) == 0
    assert pool.take() is None
