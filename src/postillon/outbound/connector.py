"""Getting a TCP connection to one next-hop host: its addresses raced with
Happy Eyeballs (RFC 8305, ``happy_eyeballs``) from a source address of the
pool that applies (``egress``: a shaping rule's ``source``, else ``[outbound]
source_addresses``). The SMTP session then runs on the winner."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postillon.outbound.egress import SourceSelector
from postillon.outbound.happy_eyeballs import DEFAULT_DELAY, interleave, race
from postillon.outbound.session_types import SessionError
from postillon.outbound.targets import Target
from postillon.outbound.tls_policy import TlsRequirement

if TYPE_CHECKING:
    from postillon.outbound.pool import PoolKey

__all__ = ["Connector", "Raced", "SourceRules"]

# A shaping rule's source pool for (recipient domain, MX host), or None for the
# global [outbound] source_addresses (the shaping rules supply it).
SourceRules = Callable[[str, str], Sequence[str] | None]


@dataclass(slots=True)
class Raced:
    """The winner of a race (None when every address failed) with its socket and
    source address, and each address that failed with why."""

    target: Target | None = None
    sock: socket.socket | None = None
    source: str | None = None
    failed: list[tuple[Target, SessionError]] = field(default_factory=list)
    # Tried, still unanswered when the winner connected (then abandoned).
    stalled: list[Target] = field(default_factory=list)


class Connector:
    def __init__(
        self,
        sources: SourceSelector,
        source_rules: SourceRules | None = None,
        *,
        prefer_ipv6: bool = False,
        delay: float = DEFAULT_DELAY,
        connect_timeout: float = 30.0,
    ) -> None:
        self.sources = sources
        self.prefer_ipv6 = prefer_ipv6
        self.delay = delay  # [outbound] happy_eyeballs_delay
        self.connect_timeout = connect_timeout
        self.source_rules = source_rules

    def source_pool(self, domain: str, host: str) -> tuple[str, ...]:
        """The source addresses towards ``host`` (an MX of ``domain``)."""
        rule = self.source_rules(domain, host) if self.source_rules is not None else None
        return self.sources.pool(rule)

    def reachable(
        self, domain: str, targets: Sequence[Target], errors: list[SessionError]
    ) -> list[Target]:
        """The targets the source pool can reach (an IPv6 address needs an IPv6
        source); each dropped one is noted in ``errors``."""
        kept = []
        for target in targets:
            pool = self.source_pool(domain, target.host)
            if target.address and not self.sources.reachable(pool, target.address):
                errors.append(SessionError(f"no source address of the family of {target.address}"))
                continue
            kept.append(target)
        return kept

    def pool_keys(
        self,
        group: Sequence[Target],
        sources: Sequence[str],
        lmtp: bool,
        requirement: TlsRequirement,
    ) -> Iterator[tuple[PoolKey, Target]]:
        """The keys an idle connection to one of ``group`` may be kept under."""
        for target in group:
            for source in self.sources.candidates(sources, target.address) or (None,):
                yield (
                    (target.address or target.host, target.port, lmtp, requirement, source),
                    target,
                )

    async def race(
        self, group: Sequence[Target], sources: Sequence[str], destination: str
    ) -> Raced:
        """Connect to one address of ``group`` (one host's), RFC 8305 style;
        ``destination`` is hashed to pick the source in ``hash`` mode."""
        if not group[0].address:  # a unix socket: the session connects itself
            return Raced(group[0])
        by_address = {t.address: t for t in group}
        outcome = await race(
            interleave(list(by_address), prefer_ipv6=self.prefer_ipv6),
            group[0].port,
            delay=self.delay,
            timeout=self.connect_timeout,
            source_for=lambda address: self.sources.choose(sources, destination, address),
        )
        raced = Raced()
        for attempt in outcome.failed:
            target = by_address[attempt.address]
            where = f"connect to {target.address}:{target.port}"
            source = f" from {attempt.source}" if attempt.source else ""
            raced.failed.append((target, SessionError(f"{where}{source} failed: {attempt.error}")))
        raced.stalled = [by_address[a.address] for a in outcome.attempts if a.error == "cancelled"]
        if outcome.address:
            raced.target = by_address[outcome.address]
            raced.sock, raced.source = outcome.sock, outcome.source
        return raced
