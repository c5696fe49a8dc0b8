"""pytest fixtures for DNS: a loopback DnsServer and a DnsResolver pointed at it.

Tests never query the machine's resolver: every lookup goes to a server started here on
127.0.0.1 (random high port, UDP and TCP). Register the fixtures suite-wide with
``pytest_plugins = ["dns_fixtures"]`` in ``tests/conftest.py`` (``tests/`` is on ``sys.path``
because conftest.py sits there); a test module may also name them in its own
``pytest_plugins``.

Fixtures:

* ``dns_zones``   the zones ``dns_server`` serves (override it in a module or class to serve
                  other data; ``DEFAULT_ZONES`` below is the default).
* ``dns_server``  a started :class:`DnsServer`; ``dns_server.nameserver`` is the
                  ``"127.0.0.1:PORT"`` string for ``[dns] nameservers``.
* ``make_dns_server``  factory ``(zones=None, **kwargs) -> started DnsServer`` for tests that
                  need several servers; all are stopped at teardown.
* ``dns_clock``   a ``FakeClock`` driving the resolver cache's TTLs.
* ``dns_resolver``  ``DnsResolver([dns_server.nameserver], timeout=0.5, attempts=1,
                  clock=dns_clock)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from postillon.core.clock import FakeClock
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.testing.dns_server import DnsServer, Zones

# Documentation ranges only: 192.0.2.0/24, 198.51.100.0/24 (RFC 5737), 2001:db8::/32 (RFC 3849).
DEFAULT_ZONES: dict[str, Any] = {
    "example.org": {
        "@": {
            "MX": ["10 mx1.example.org", "10 mx2.example.org", "20 backup.example.net"],
            "TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"'],
            "A": "192.0.2.10",
        },
        "mx1.example.org": {"A": "192.0.2.1", "AAAA": "2001:db8::1"},
        "mx2.example.org": {"A": "192.0.2.2"},
        "_25._tcp.mx1.example.org": {"TLSA": "3 1 1 " + "ab" * 32},
        "www.example.org": {"CNAME": "example.org"},
    },
    "example.net": {
        "@": {"A": "198.51.100.1"},  # no MX: implicit MX
        "backup.example.net": {"A": "198.51.100.2", "AAAA": "2001:db8:1::2"},
    },
    "nullmx.test": {"@": {"MX": "0 ."}},
    "2.0.192.in-addr.arpa": {"1.2.0.192.in-addr.arpa": {"PTR": "mx1.example.org"}},
}

MakeDnsServer = Callable[..., DnsServer]


@pytest.fixture
def dns_zones() -> Zones:
    return copy.deepcopy(DEFAULT_ZONES)


@pytest.fixture
def dns_server(dns_zones: Zones) -> Iterator[DnsServer]:
    with DnsServer(dns_zones) as server:
        yield server


@pytest.fixture
def make_dns_server() -> Iterator[MakeDnsServer]:
    servers: list[DnsServer] = []

    def make(zones: Zones | str | None = None, **kwargs: Any) -> DnsServer:
        server = DnsServer(zones, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def dns_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dns_resolver(dns_server: DnsServer, dns_clock: FakeClock) -> DnsResolver:
    return DnsResolver([dns_server.nameserver], timeout=0.5, attempts=1, clock=dns_clock)
