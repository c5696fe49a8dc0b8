"""Connection admission: total sessions and sessions per client.

Both are client-controlled resources; past either limit the listener answers
``421 4.7.0`` and closes instead of queueing more work (RFC 5321 §3.8 allows a
server to refuse service with 421 at the greeting).

"Per client" is per ``client_key`` (IPv4 address, IPv6 /64), the key the AUTH
failure budget and the rate limits use: keyed by exact address, one IPv6 host
could open ``connections_per_ip`` sessions from each of its 2^64 addresses.
"""

from __future__ import annotations

from collections import Counter

from postillon.core.client import client_key


class ConnectionLimiter:
    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._by_client: Counter[str] = Counter()
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
        key = client_key(ip)
        if self._count >= self.total:
            return "too many connections"
        if self._by_client[key] >= self.per_ip:
            return "too many connections from your address"
        self._count += 1
        self._by_client[key] += 1
        return None

    def release(self, ip: str) -> None:
        key = client_key(ip)
        self._count -= 1
        self._by_client[key] -= 1
        if self._by_client[key] <= 0:
            del self._by_client[key]
