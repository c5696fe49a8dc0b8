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
from postillon.queue.store import GreylistPolicy, GreylistStore

__all__ = ["GreylistCheck", "build", "client_network", "greylisted_reply"]


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
        ask = self.store.peek if self.dry_run else self.store.check
        result = await ask(net, tx.sender, rcpt.address, self.clock.now(), self.policy)
        triplet = f"({net}, <{tx.sender}>, <{rcpt.address}>)"
        if result.allowed:
            return proceed(f"triplet {triplet}: {result.status}")
        saw = f"triplet {triplet}: {result.status}, retry in {result.retry_in:.0f}s"
        return reject(
            greylisted_reply(result.retry_in), saw, reason="greylisted", metric="greylist"
        )


def build(kind: ListenerKind, parts: PipelineParts) -> GreylistCheck | None:
    config = parts.config.greylist
    if kind != "smtp" or not config.enabled or parts.store is None:
        return None
    greylist = parts.store.policy_state.greylist
    return GreylistCheck(config, greylist, parts.clock, dry_run=parts.dry_run)
