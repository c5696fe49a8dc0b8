"""The key under which every per-client limit counts a client address.

One function for every limit (connections per client, the AUTH failure
budget, the submission rate limits): if two limits grouped addresses
differently, a client could spend one limit's budget from addresses the
other sees as distinct (a /64 of IPv6 addresses is 2^64 "clients" to a limit
keyed by exact address).
"""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)  # asked several times per session for the same client
def client_key(ip: str) -> str:
    """IPv4 as is; IPv6 by its /64 (one host, or one customer of an ISP, usually
    owns a whole /64: RFC 6177); an IPv4-mapped IPv6 address as its IPv4 address
    (a dual-stack listener sees IPv4 clients that way). Anything else (a Unix
    socket's "local") is its own key."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
