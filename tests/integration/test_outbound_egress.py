"""Egress addresses and Happy Eyeballs, end to end between two real
``postillon serve`` processes, with MX records from a DNS server on loopback.

    smtplib ──▶ A ──[outbound] source_addresses 127.0.0.6 / 127.0.0.7──▶ B (127.0.0.5)
                   HELO out1.test / out2.test           B writes both into Received:

    A ──MX mx.he.test: AAAA ::1 (black hole: SYNs dropped), A 127.0.0.5──▶ B
        Happy Eyeballs: ::1 tried first (prefer_ipv6), 127.0.0.5 one stagger later
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from support.blackhole import BlackHole
from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

B_HOST = "127.0.0.5"


def zones() -> dict[str, Any]:
    return {
        "remote.test": {"@": {"MX": "10 mx.remote.test"}, "mx.remote.test": {"A": B_HOST}},
        "he.test": {
            "@": {"MX": "10 mx.he.test"},
            "mx.he.test": {"AAAA": "::1", "A": B_HOST},
        },
    }


def receiver(make_server: Any, port: int) -> ServerProcess:
    b: ServerProcess = make_server(
        listen=[{"kind": "smtp", "address": f"{B_HOST}:{port}"}],
        domain=[
            {"name": "remote.test", "mailboxes": ["bob"]},
            {"name": "he.test", "mailboxes": ["carol"]},
        ],
    )
    return b.start()


def received_from(path: Any) -> str:
    """The first Received: line's from clause (B's own), unfolded."""
    text = path.read_bytes().decode()
    match = re.search(r"^Received: from (.*?)\n\s+by ", text, re.M | re.S)
    assert match, text[:800]
    return " ".join(match.group(1).split())


def test_mail_leaves_from_each_source_address_with_its_helo_name(
    make_server: Any, make_dns_server: Any
) -> None:
    dns = make_dns_server(zones())
    port = free_port(B_HOST)
    b = receiver(make_server, port)
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={
            "port": port,
            "connect_timeout": 5.0,
            "idle_reuse": 0,  # a new connection (and a new turn) per message
            "source_addresses": ["127.0.0.6", "127.0.0.7"],
            "helo_names": {"127.0.0.6": "out1.test", "127.0.0.7": "out2.test"},
        },
    ).start()
    for n in range(2):
        qid = a.send_message("bob@remote.test", f"Subject: {n}\r\n\r\nhi\r\n".encode())
        assert "delivered" in a.wait_outcome(qid)
    froms = sorted(received_from(p) for p in b.wait_for_mail("bob@remote.test", count=2))
    assert froms[0].startswith("out1.test") and "[127.0.0.6]" in froms[0], froms
    assert froms[1].startswith("out2.test") and "[127.0.0.7]" in froms[1], froms


def test_happy_eyeballs_skips_a_black_holed_ipv6_address_within_the_stagger(
    make_server: Any, make_dns_server: Any
) -> None:
    dns = make_dns_server(zones())
    port = free_port(B_HOST)
    with BlackHole("::1", port):
        b = receiver(make_server, port)
        a = make_server(
            relay={"trusted_networks": ["127.0.0.0/8"]},
            dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
            outbound={
                "port": port,
                "prefer_ipv6": True,  # the dead address is tried first
                "connect_timeout": 60.0,  # without Happy Eyeballs: a minute per try
                "happy_eyeballs_delay": 0.25,
            },
        ).start()
        started = time.monotonic()
        qid = a.send_message("carol@he.test")
        line = a.wait_outcome(qid, timeout=30)
        elapsed = time.monotonic() - started
        assert "delivered" in line and f"[{B_HOST}]" in line, line
        b.wait_for_mail("carol@he.test")
        # A generous bound: far below the 60 s connect timeout the dead address
        # would have cost when addresses were tried one after another.
        assert elapsed < 20
        # The dead address was tried first and abandoned for the live one.
        assert f"{qid}: mx.he.test[::1]:{port} did not answer within 0.25s" in a.maillog()
    assert dns.query_count("mx.he.test", "AAAA") >= 1
