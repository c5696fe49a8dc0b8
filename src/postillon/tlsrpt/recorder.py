"""The TLS observer the SMTP transport calls: counts in memory, flushes to the store.

Design note
-----------
:meth:`TlsReportRecorder.tls_session` runs on the delivery path, once per outbound
MX session (``outbound.tls_observer``), so it only adds 1 to a counter in a dict:
no I/O, no await. :meth:`flush` hands the counters to ``store.tls_reports.add``
(an UPSERT that adds, so every node of a cluster contributes) and runs every
``flush_interval`` seconds in a background task and once more at stop, so a
restart keeps what was counted; a crash loses at most one interval. A failed
flush keeps its counts for the next one.

Successes are counted per (day, domain, policy) only; failures also keep the MX
host, the receiving IP and the sending IP (RFC 8460 §4.4 ``failure-details``).
The transport does not know the local address of a connection that failed, so
the sending IP is the source address this host uses to reach the receiving IP
(the kernel's route choice, found with a connected UDP socket: no packet is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from postillon.core.clock import Clock
from postillon.core.tlsrpt import SUCCESS, TlsResultCount, utc_day
from postillon.outbound.tls_observer import TlsSessionResult
from postillon.queue.store import TlsReportStore
from postillon.tlsrpt.labels import result_type

__all__ = ["TlsReportRecorder", "source_address"]

log = logging.getLogger("postillon.tlsrpt")

# Counters kept between flushes at most; past it, new ones wait for the next flush
# (failures are few distinct rows; a flood of distinct ones must not eat memory).
MAX_PENDING = 100_000


def source_address(receiving_ip: str) -> str:
    """The local address packets to ``receiving_ip`` leave from ("" if unknown)."""
    if not receiving_ip:
        return ""
    family = socket.AF_INET6 if ":" in receiving_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((receiving_ip, 25))  # UDP: chooses the route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return ""


class TlsReportRecorder:
    """A ``TlsObserver`` writing RFC 8460 counters to ``store`` (see the module note)."""

    def __init__(
        self,
        store: TlsReportStore,
        clock: Clock,
        *,
        flush_interval: float = 30.0,
        local_address: Callable[[str], str] = source_address,
    ) -> None:
        self._store = store
        self._clock = clock
        self.flush_interval = flush_interval
        self._local_address = local_address
        self._sources: dict[str, str] = {}  # receiving IP → our source address
        self._pending: dict[TlsResultCount, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    # -- TlsObserver -----------------------------------------------------------
    def tls_session(self, result: TlsSessionResult) -> None:
        kind = result_type(result.mode, result.result, result.reason)
        if kind is None:
            return
        day = utc_day(self._clock.now())
        domain = result.policy_domain.lower().rstrip(".")
        if kind == SUCCESS:
            row = TlsResultCount(day, domain, result.policy_type, result.policy_strings, kind)
        else:
            row = TlsResultCount(
                day,
                domain,
                result.policy_type,
                result.policy_strings,
                kind,
                result.mx_host.lower().rstrip("."),
                self._source(result.receiving_ip),
                result.receiving_ip,
                result.result,
            )
        if row in self._pending:
            self._pending[row] += 1
        elif len(self._pending) < MAX_PENDING:
            self._pending[row] = 1

    def _source(self, receiving_ip: str) -> str:
        source = self._sources.get(receiving_ip)
        if source is None:
            if len(self._sources) > 10_000:
                self._sources.clear()
            source = self._sources[receiving_ip] = self._local_address(receiving_ip)
        return source

    # -- to the store ----------------------------------------------------------
    @property
    def pending(self) -> int:
        """Sessions counted and not yet flushed."""
        return sum(self._pending.values())

    async def flush(self) -> None:
        async with self._flushing:
            batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                await self._store.add([row.with_count(n) for row, n in batch.items()])
            except Exception as exc:  # the store is down: keep the counts for the next try
                log.warning("TLS report counters not saved (kept for the next try): %s", exc)
                for row, n in batch.items():
                    self._pending[row] = self._pending.get(row, 0) + n

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def stop(self) -> None:
        """Stop the background flushes and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
