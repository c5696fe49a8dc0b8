"""Egress: which local (source) address an outbound connection leaves from,
and the HELO name that goes with it.

A sender with several public addresses spreads its mail over them, and each
address must greet with the name its PTR record gives (receivers check that
the HELO name, the PTR and the A record agree). ``[outbound] source_addresses``
is the default pool; a shaping rule may bring its own pool (``source = [...]``),
which the caller passes to :meth:`SourceSelector.choose` instead.

A pool is chosen from in one of two ways:

``round-robin``
    each new connection takes the next address of the pool (per pool and
    address family), spreading the volume evenly;
``hash``
    the destination's name picks the address (a stable hash, the same on every
    node and after a restart), so one receiver always sees one sender address
    and its reputation builds on that address alone.

Only addresses of the remote address's family can be used (an IPv4 source
cannot reach an IPv6 destination). When a pool is configured but holds no
address of that family, the destination address is not tried at all: leaving
from an unconfigured address would greet with a name whose PTR does not match.
An empty pool means "let the kernel choose", as before.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EgressSettings", "Selection", "SourceSelector", "family_of"]

Selection = Literal["round-robin", "hash"]


@functools.lru_cache(maxsize=1024)  # once per connection: parsing the address again is waste
def family_of(address: str) -> int:
    """4 or 6 (a unix socket path or a name counts as 4: no source applies)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 4


@dataclass(frozen=True, slots=True)
class EgressSettings:
    """``[outbound] source_addresses``, ``helo_names`` and ``source_selection``."""

    source_addresses: tuple[str, ...] = ()
    helo_names: Mapping[str, str] = field(default_factory=dict)
    selection: Selection = "round-robin"


class SourceSelector:
    """Chooses the source address of each new connection (see the module note)."""

    def __init__(self, settings: EgressSettings, default_helo: str) -> None:
        self.settings = settings
        self.default_helo = default_helo
        # One counter per (pool, family), so two pools do not disturb each other's turns.
        self._turns: dict[tuple[tuple[str, ...], int], itertools.count[int]] = {}

    def pool(self, rule_sources: Sequence[str] | None = None) -> tuple[str, ...]:
        """The pool that applies: a shaping rule's ``source`` list, else the global one."""
        return tuple(rule_sources) if rule_sources else self.settings.source_addresses

    @staticmethod
    def reachable(pool: Sequence[str], remote: str) -> bool:
        """Whether ``remote`` can be reached from ``pool`` (an empty pool reaches all)."""
        if not pool:
            return True
        family = family_of(remote)
        return any(family_of(a) == family for a in pool)

    def candidates(self, pool: Sequence[str], remote: str) -> tuple[str, ...]:
        """The pool's addresses usable towards ``remote`` (its address family)."""
        family = family_of(remote)
        return tuple(a for a in pool if family_of(a) == family)

    def choose(self, pool: Sequence[str], destination: str, remote: str) -> str | None:
        """The source address for a new connection to ``remote`` (an IP address) for
        ``destination`` (the next-hop name, hashed in ``hash`` mode); None: the
        kernel chooses (empty pool). Raises ValueError when the pool has no address
        of ``remote``'s family (check :meth:`reachable` first)."""
        if not pool:
            return None
        usable = self.candidates(pool, remote)
        if not usable:
            raise ValueError(f"no source address of the family of {remote} in {list(pool)}")
        if self.settings.selection == "hash":
            digest = hashlib.sha256(destination.lower().encode()).digest()
            return usable[int.from_bytes(digest[:8], "big") % len(usable)]
        turn = self._turns.setdefault((tuple(pool), family_of(remote)), itertools.count())
        return usable[next(turn) % len(usable)]

    def helo_name(self, source: str | None) -> str:
        """The HELO/EHLO name to say from ``source`` (its ``helo_names`` entry)."""
        if source is None:
            return self.default_helo
        return self.settings.helo_names.get(source, self.default_helo)
