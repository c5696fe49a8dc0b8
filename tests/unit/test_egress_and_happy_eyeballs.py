"""Source address selection (outbound/egress.py) and the Happy Eyeballs race
(outbound/happy_eyeballs.py, RFC 8305) over real loopback sockets, one of
them black-holed (a listener whose accept queue is full: SYNs are dropped)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from postillon.outbound.egress import EgressSettings, SourceSelector
from postillon.outbound.happy_eyeballs import interleave, race
from support.blackhole import BlackHole


def selector(selection: str = "round-robin") -> SourceSelector:
    settings = EgressSettings(
        ("127.0.0.2", "127.0.0.3", "::1"),
        {"127.0.0.2": "out1.test", "::1": "out6.test"},
        selection,  # type: ignore[arg-type]
    )
    return SourceSelector(settings, "default.test")


def test_round_robin_takes_turns_within_the_remote_family() -> None:
    s = selector()
    pool = s.pool()
    picks = [s.choose(pool, "d.test", "192.0.2.1") for _ in range(4)]
    assert picks == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
    assert s.choose(pool, "d.test", "2001:db8::1") == "::1"


def test_hash_is_stable_per_destination_and_spreads_destinations() -> None:
    s, other = selector("hash"), selector("hash")
    pool = s.pool()
    assert {s.choose(pool, "d.test", "192.0.2.1") for _ in range(5)} == {
        other.choose(pool, "D.test", "192.0.2.9")
    }
    spread = {s.choose(pool, f"d{i}.test", "192.0.2.1") for i in range(20)}
    assert spread == {"127.0.0.2", "127.0.0.3"}


def test_rule_pool_replaces_the_global_one_and_families_must_fit() -> None:
    s = selector()
    rule = s.pool(["127.0.0.9"])
    assert rule == ("127.0.0.9",)
    assert s.choose(rule, "d.test", "192.0.2.1") == "127.0.0.9"
    assert not s.reachable(rule, "2001:db8::1")  # no IPv6 source: not tried at all
    with pytest.raises(ValueError, match="no source address"):
        s.choose(rule, "d.test", "2001:db8::1")
    assert s.reachable((), "2001:db8::1") and s.choose((), "d.test", "2001:db8::1") is None


def test_helo_name_per_source() -> None:
    s = selector()
    assert s.helo_name("127.0.0.2") == "out1.test"
    assert s.helo_name("127.0.0.3") == "default.test"  # no entry: the global helo_name
    assert s.helo_name(None) == "default.test"


def test_interleave_alternates_families_preferred_first() -> None:
    addrs = ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "2001:db8::3"]
    assert interleave(addrs) == [
        "2001:db8::1",
        "192.0.2.1",
        "2001:db8::2",
        "192.0.2.2",
        "2001:db8::3",
    ]
    assert interleave(addrs, prefer_ipv6=False)[:2] == ["192.0.2.1", "2001:db8::1"]
    assert interleave(["192.0.2.1"]) == ["192.0.2.1"]


async def _accepting(host: str, port: int, seen: list[str]) -> asyncio.Server:
    def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        writer.close()

    return await asyncio.start_server(note, host, port)


async def test_a_black_holed_first_address_costs_one_stagger_not_a_timeout() -> None:
    with BlackHole("::1") as hole:
        seen: list[str] = []
        server = await _accepting("127.0.0.1", hole.port, seen)
        try:
            started = time.monotonic()
            result = await race(
                ["::1", "127.0.0.1"],
                hole.port,
                delay=0.1,
                timeout=30,
                source_for=lambda a: "127.0.0.7" if ":" not in a else None,
            )
            elapsed = time.monotonic() - started
        finally:
            server.close()
        assert result.sock is not None and result.address == "127.0.0.1"
        assert result.sock.getsockname()[0] == "127.0.0.7"  # bound to the chosen source
        result.sock.close()
        # The dead address was tried first, then given up on (cancelled) once the
        # second one connected; a generous bound, far below the 30 s connect timeout.
        assert [(a.address, a.error) for a in result.attempts] == [
            ("127.0.0.1", ""),
            ("::1", "cancelled"),
        ]
        assert elapsed < 10


async def test_a_refused_address_starts_the_next_at_once_and_all_failing_is_reported() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on port now: connection refused
    result = await race(["127.0.0.1", "127.0.0.2"], port, delay=30, timeout=5)
    assert result.sock is None
    assert [a.address for a in result.failed] == ["127.0.0.1", "127.0.0.2"]
    assert all("refused" in a.error.lower() for a in result.failed)


def test_config_keys_are_checked_and_named() -> None:
    from postillon.config.loader import ConfigError, parse_config

    ok = parse_config(
        {
            "outbound": {
                "source_addresses": ["2001:DB8:0::10", "192.0.2.10"],
                "helo_names": {"2001:db8::10": "out6.example.org"},
                "source_selection": "hash",
            }
        }
    )
    assert ok.outbound.source_addresses == ("2001:db8::10", "192.0.2.10")
    assert ok.outbound.helo_names == {"2001:db8::10": "out6.example.org"}
    with pytest.raises(ConfigError, match=r"outbound\.source_addresses"):
        parse_config({"outbound": {"source_addresses": ["out1.example.org"]}})
    with pytest.raises(ConfigError, match=r"outbound\.helo_names"):
        parse_config({"outbound": {"helo_names": {"192.0.2.10": "two words"}}})
    with pytest.raises(ConfigError, match=r"outbound\.happy_eyeballs_delay"):
        parse_config({"outbound": {"happy_eyeballs_delay": 0}})


def test_a_shaping_rules_source_pool_replaces_the_global_one_for_its_hosts() -> None:
    """The hook the shaping rules fill (SmtpTransport(source_rules=...)): a rule
    matched by MX host suffix gives its own pool; other hosts use the global one."""
    from postillon.outbound.connector import Connector
    from postillon.outbound.session_types import SessionError
    from postillon.outbound.targets import Target

    def rules(domain: str, host: str) -> list[str] | None:
        return ["127.0.0.9"] if host.endswith(".provider.test") else None

    connector = Connector(selector(), rules)
    assert connector.source_pool("d.test", "mx1.provider.test") == ("127.0.0.9",)
    assert connector.source_pool("d.test", "mx.other.test") == ("127.0.0.2", "127.0.0.3", "::1")
    # The rule's pool has no IPv6 address: the provider's AAAA is not tried.
    errors: list[SessionError] = []
    targets = [
        Target("mx1.provider.test", "2001:db8::25", 25, None),
        Target("mx1.provider.test", "192.0.2.25", 25, None),
    ]
    assert connector.reachable("d.test", targets, errors) == targets[1:]
    assert "no source address of the family of 2001:db8::25" in errors[0].detail
