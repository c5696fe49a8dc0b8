"""The message history: mail log events with a queue id, kept in the queue store.

Design note
-----------
Every mail log event that names a queue id (received, deferred, delivered,
bounced, expired, bounce, error) is also a step of that message's history,
which the admin page and ``postillon queue events`` show. The recorder
subscribes to the mail log, buffers events in memory and writes them in one
store write every ``flush_interval`` seconds (or sooner when the buffer
fills), so the hot path never waits for history and a burst of mail costs a
handful of writes, not one per event. History is best effort: a failed write
is logged and dropped, never retried at the expense of mail, and a crash
loses at most the last interval. Events older than ``retention`` are pruned
about once an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from postillon.core.clock import Clock
from postillon.core.queueid import is_queue_id
from postillon.queue.store import QueueEvent, QueueStore

log = logging.getLogger("postillon.history")

PRUNE_EVERY: Final = 3600.0
# Above this many buffered events the recorder flushes at once; far above it
# (the store is stuck) new events are dropped rather than eating memory.
FLUSH_AT: Final = 1000
DROP_AT: Final = 100_000


def _plain(value: Any) -> Any:
    """A JSON-safe value (the store keeps fields as JSON)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class HistoryRecorder:
    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        retention: float,
        *,
        flush_interval: float = 0.5,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retention = retention
        self.flush_interval = flush_interval
        self._buffer: list[QueueEvent] = []
        self._full = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.dropped = 0

    def on_event(self, event: str, queue_id: str, fields: dict[str, Any]) -> None:
        """A mail log listener: remember events that belong to a message."""
        if not is_queue_id(queue_id):  # "" or a placeholder such as "-"
            return
        if len(self._buffer) >= DROP_AT:
            self.dropped += 1
            return
        plain = {k: _plain(v) for k, v in fields.items() if v is not None}
        self._buffer.append(QueueEvent(queue_id, self.clock.now(), event, plain))
        if len(self._buffer) >= FLUSH_AT:
            self._full.set()

    async def record(self, events: list[QueueEvent]) -> None:
        """Write events now (operator actions: they should show at once)."""
        await self.flush()
        await self.store.add_events(events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="history-recorder")

    async def stop(self) -> None:
        self._stop.set()
        self._full.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            await self.store.add_events(batch)
        except Exception:
            log.warning("could not store %d history event(s)", len(batch), exc_info=True)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self._full.wait()
            self._full.clear()
            await self.flush()
            now = self.clock.now()
            if now - self._last_prune >= PRUNE_EVERY:
                self._last_prune = now
                try:
                    await self.store.prune_events(now - self.retention)
                except Exception:
                    log.warning("could not prune the message history", exc_info=True)
