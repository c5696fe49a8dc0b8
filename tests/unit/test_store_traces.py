"""The decision trace (store.py step 8, queue/traces.py) against every store.

Run with the contract suite's store factories (memory, SQLite, a real PostgreSQL): a
session's steps come back in order; a message's story is its session's steps before
and of its transaction (not the session's other messages); sessions are found by
client and time, rejected ones alone when asked; old steps are pruned; and a second
store object on the same database (another process, another node) reads them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store_contract import STORE_FACTORIES, T0

from postillon.core.trace import TraceStep
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


def step(session: str, at: float, check: str, action: str = "continue", **kw: str) -> TraceStep:
    return TraceStep(session, T0 + at, kw.pop("phase", "rcpt"), check, action, **kw)


SESSION_A = [
    step("SA", 0, "session", "connect", phase="connect", client_ip="192.0.2.1"),
    step("SA", 1, "dnsbl", saw="listed nowhere", phase="connect", client_ip="192.0.2.1"),
    step("SA", 2, "relay", queue_id="Q1", client_ip="192.0.2.1"),
    step("SA", 3, "session", "queued", queue_id="Q1", client_ip="192.0.2.1"),
    step("SA", 4, "relay", queue_id="Q2", client_ip="192.0.2.1"),
]
SESSION_B = [
    step("SB", 10, "dnsbl", "reject", reply="554 5.7.1 no", client_ip="198.51.100.7"),
]


async def test_a_session_and_a_message_story(store: QueueStore) -> None:
    await store.traces.add(SESSION_A + SESSION_B)
    assert await store.traces.session("SA") == SESSION_A
    story = await store.traces.message("Q1")
    assert [s.check for s in story] == ["session", "dnsbl", "relay", "session"]
    assert await store.traces.message("nothing") == []


async def test_sessions_by_client_time_and_refusal(store: QueueStore) -> None:
    traces = store.traces
    await traces.add(SESSION_A + SESSION_B)
    assert await traces.sessions("198.51.100.7", T0, T0 + 100) == SESSION_B
    assert await traces.sessions("198.51.100.7", T0 + 11, T0 + 100) == []
    assert {s.session_id for s in await traces.sessions("", T0, T0 + 100)} == {"SA", "SB"}
    assert await traces.sessions("", T0, T0 + 100, rejected_only=True) == SESSION_B
    newest = await traces.sessions("", T0, T0 + 100, limit=1)
    assert newest == SESSION_B


async def test_prune_drops_old_steps(store: QueueStore) -> None:
    await store.traces.add(SESSION_A + SESSION_B)
    assert await store.traces.prune(T0 + 5) == len(SESSION_A)
    assert await store.traces.session("SA") == []
    assert await store.traces.session("SB") == SESSION_B


async def test_another_process_reads_what_one_wrote(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "queue.db")
    await first.traces.add(SESSION_A)
    second = SqliteStore(tmp_path / "queue.db")
    try:
        assert await second.traces.message("Q1") == SESSION_A[:4]
    finally:
        await first.close()
        await second.close()
