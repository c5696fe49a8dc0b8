"""Greylisting at RCPT, on MX (``smtp``) listeners: ``[greylist]``.

The first attempt of an unknown triplet (client network, envelope sender, recipient)
is answered ``450 4.7.1`` and a retry after ``delay`` seconds is accepted: a real MTA
retries, most spam engines do not. The client network is the /24 (IPv4) or /64 (IPv6)
of its address (``ipv4_prefix``/``ipv6_prefix``), since a pool of outbound servers
retries from a neighbour address. A client network that passed ``auto_allow_after``
triplets skips greylisting. Never greylisted: authenticated clients, ``[relay]
trusted_networks``, and clients a DNS allow-list vouched for (a ``"dnswl"`` note left
by the DNSBL check at connect).

The state (``queue/greylist_state.py``) is in the queue store: a restart keeps it and
every node of a cluster shares it. If the store cannot answer, the recipient gets
``451 4.3.0`` (the pipeline's reply for a check that failed): a temporary answer, as
greylisting's own.

A pass is also remembered in this process for ``PASS_MEMORY`` seconds, so the senders a
busy MX sees all day cost no store read (a thread hop on SQLite, a round trip on
PostgreSQL) per recipient. Only passes are remembered, and nothing but expiry (weeks)
takes a pass back; a remembered pass does not refresh ``last_seen``, which then lags at
most ``refresh_after`` plus that minute, moving the triplet's expiry as much earlier.
"""

from __future__ import annotations

import ipaddress

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.config.inbound_filters import GreylistConfig
from postillon.core.clock import Clock
from postillon.core.reply import Reply
from postillon.queue.store import GreylistPolicy, GreylistResult, GreylistStore

__all__ = ["GreylistCheck", "build", "client_network", "greylisted_reply"]

PASS_MEMORY = 60.0  # seconds a pass the store gave is answered from memory
PASS_MEMORY_SIZE = 10_000  # triplets and client networks remembered at most


def client_network(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network a client address counts in (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # "local" (a Unix socket): its own network
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def greylisted_reply(retry_in: float) -> Reply:
    # RFC 3463 4.7.1: delivery not authorized, temporary. The text says what to do.
    wait = max(1, round(retry_in))
    return Reply.of(450, "4.7.1", f"Greylisted: please try again in {wait} seconds")


class GreylistCheck(BaseCheck):
    name = "greylist"
    phases: frozenset[Phase] = frozenset({"rcpt"})

    def __init__(
        self, config: GreylistConfig, store: GreylistStore, clock: Clock, *, dry_run: bool = False
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        # explain --simulate: answer as check would, record nothing.
        self.dry_run = dry_run
        self.policy = GreylistPolicy(config.delay, config.expiry, config.auto_allow_after)
        # triplet key or client network -> (until when, the store's status); oldest first
        self._passed: dict[str, tuple[float, str]] = {}

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        client = s.client
        if client.authenticated or client.trusted or s.notes.get("dnswl"):
            why = (
                "authenticated client"
                if client.authenticated
                else "trusted network"
                if client.trusted
                else "listed by a DNS allow-list"
            )
            return proceed(f"not greylisted: {why}")
        net = client_network(client.ip, self.config.ipv4_prefix, self.config.ipv6_prefix)
        triplet = f"({net}, <{tx.sender}>, <{rcpt.address}>)"
        now = self.clock.now()
        key = f"{net}/{tx.sender.lower()}/{rcpt.address.lower()}"
        remembered = self._remembered(net, now) or self._remembered(key, now)
        if remembered:
            return proceed(f"triplet {triplet}: {remembered} (remembered)")
        ask = self.store.peek if self.dry_run else self.store.check
        result = await ask(net, tx.sender, rcpt.address, now, self.policy)
        if result.allowed:
            if not self.dry_run:
                self._remember(net if result.status == "client-allowed" else key, now, result)
            return proceed(f"triplet {triplet}: {result.status}")
        saw = f"triplet {triplet}: {result.status}, retry in {result.retry_in:.0f}s"
        return reject(
            greylisted_reply(result.retry_in), saw, reason="greylisted", metric="greylist"
        )

    def _remembered(self, key: str, now: float) -> str:
        """The status of a pass remembered for ``key`` and still fresh, else ""."""
        entry = self._passed.get(key)
        if entry is None:
            return ""
        if entry[0] <= now:
            del self._passed[key]
            return ""
        return entry[1]

    def _remember(self, key: str, now: float, result: GreylistResult) -> None:
        self._passed.pop(key, None)
        self._passed[key] = (now + PASS_MEMORY, result.status)
        if len(self._passed) > PASS_MEMORY_SIZE:
            del self._passed[next(iter(self._passed))]


def build(kind: ListenerKind, parts: PipelineParts) -> GreylistCheck | None:
    config = parts.config.greylist
    if kind != "smtp" or not config.enabled or parts.store is None:
        return None
    greylist = parts.store.policy_state.greylist
    return GreylistCheck(config, greylist, parts.clock, dry_run=parts.dry_run)
