"""Relay protection: who may send to which recipient (no open relay).

A recipient in a local domain is accepted only if it resolves to a mailbox,
an alias or the domain's catch-all. Any other domain is accepted only from a
trusted network or an authenticated client; everyone else gets
``554 5.7.1 Relay access denied`` at RCPT. The address is never
reinterpreted: ``bob%remote@local``, ``remote!bob@local`` and
``"bob@remote"@local`` are local parts of a *local* domain, so they either
name a mailbox or are refused; they never reach ``remote``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from postillon.core.address import Address
from postillon.core.recipient import RecipientAccepted, RecipientRejected
from postillon.core.reply import Reply
from postillon.routing.local import LocalRecipients

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def relay_denied(recipient: Address) -> Reply:
    return Reply.of(554, "5.7.1", f"<{recipient}>: Relay access denied")


class RelayPolicy:
    def __init__(self, local: LocalRecipients, trusted_networks: Sequence[str]) -> None:
        self.local = local
        self._trusted: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in trusted_networks
        )
        # Asked for every recipient of a session from the same address: parse it once.
        self._trusted_cache = functools.lru_cache(maxsize=4096)(self._is_trusted)

    def is_trusted(self, ip: str) -> bool:
        return self._trusted_cache(ip)

    def _is_trusted(self, ip: str) -> bool:
        if not ip or not self._trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted)

    def check_recipient(
        self, recipient: Address, client_ip: str, authenticated: bool = False
    ) -> RecipientAccepted | RecipientRejected:
        if not recipient.domain or self.local.is_local_domain(recipient.domain):
            return self.local.resolve(recipient)
        if authenticated or self.is_trusted(client_ip):
            return RecipientAccepted((str(recipient),))
        return RecipientRejected(relay_denied(recipient))
