"""Recently committed messages, kept in memory for the local runner.

A message committed here is usually delivered a few milliseconds later by
the same process. Re-reading its envelope and body from the store costs a
thread hop and a read transaction per message on the hot path; this bounded
cache hands them over directly. It is only a cache: the store stays the
truth, a miss (another node, a restart, an evicted entry) reads the store,
and nothing here is needed for durability.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from postillon.queue.store import MessageInfo

# Bodies larger than this are never cached (they stream from the store).
MAX_CACHED_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class RecentMessage:
    info: MessageInfo  # envelope; ``records`` is empty
    body: bytes | None


class RecentMessages:
    def __init__(self, max_bytes: int = 32 * 1024 * 1024, max_entries: int = 20_000) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, RecentMessage] = OrderedDict()
        self._bytes = 0

    def put(self, info: MessageInfo, body: bytes | None) -> None:
        if info.queue_id in self._entries:
            self.drop(info.queue_id)
        self._entries[info.queue_id] = RecentMessage(info, body)
        self._bytes += len(body or b"")
        while self._entries and (
            self._bytes > self.max_bytes or len(self._entries) > self.max_entries
        ):
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old.body or b"")

    def get(self, queue_id: str) -> RecentMessage | None:
        return self._entries.get(queue_id)

    def drop(self, queue_id: str) -> None:
        entry = self._entries.pop(queue_id, None)
        if entry is not None:
            self._bytes -= len(entry.body or b"")

    def __len__(self) -> int:
        return len(self._entries)
