"""Connection admission: total sessions and sessions per client IP.

Both are client-controlled resources; past either limit the listener answers
``421 4.7.0`` and closes instead of queueing more work (RFC 5321 §3.8 allows a
server to refuse service with 421 at the greeting).
"""

from __future__ import annotations

from collections import Counter


class ConnectionLimiter:
    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._by_ip: Counter[str] = Counter()
        self._count = 0

    def reconfigure(self, total: int, per_ip: int) -> None:
        """New limits from a reload. Sessions already admitted stay; a lower limit
        only refuses new connections until enough of them have ended."""
        self.total = total
        self.per_ip = per_ip

    @property
    def active(self) -> int:
        return self._count

    def try_acquire(self, ip: str) -> str | None:
        """Take a slot; return None on success or the reason it was refused."""
        if self._count >= self.total:
            return "too many connections"
        if self._by_ip[ip] >= self.per_ip:
            return "too many connections from your address"
        self._count += 1
        self._by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self._count -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]
