"""Resolver pieces that need no network: nameserver parsing, the cache, configuration."""

from __future__ import annotations

from pathlib import Path

import dns.name
import pytest

from postillon.core.clock import FakeClock
from postillon.dns.dnspython_resolver import DnsCache, DnsResolver, parse_nameserver
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, MxRecord, TxtRecord


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        (" 192.0.2.1:53 ", ("192.0.2.1", 53)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
        ("2001:DB8::1", ("2001:db8::1", 53)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "dns.example.org",
        "dns.example.org:53",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1:x",
        "[::1",
        "[::1]x",
        "[::1]:",
        "300.0.0.1",
    ],
)
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(entry)


def test_configured_nameservers() -> None:
    resolver = DnsResolver(["127.0.0.1:5353", "::1", "[::1]:5300"])
    assert resolver.nameservers == ["127.0.0.1:5353", "[::1]:53", "[::1]:5300"]


def test_without_nameservers_the_system_configuration_is_read(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver ::1\nsearch example.org\n")
    resolver = DnsResolver(resolv_conf=str(conf))
    assert resolver.nameservers == ["127.0.0.53:53", "[::1]:53"]


def test_system_configuration_without_nameservers_is_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# nothing\n")
    with pytest.raises(ValueError):
        DnsResolver(resolv_conf=str(conf))


@pytest.mark.parametrize(
    "kwargs", [{"timeout": 0}, {"attempts": 0}, {"ipv4": False, "ipv6": False}]
)
def test_bad_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DnsResolver(["127.0.0.1"], **kwargs)  # type: ignore[arg-type]


async def test_invalid_names_fail_before_any_query() -> None:
    # Port 9 (discard) on loopback: nothing is sent, since the names never reach the wire.
    resolver = DnsResolver(["127.0.0.1:9"], timeout=0.1, attempts=1)
    for name in ("", "a..b", "-" * 70 + ".org", "bad\u00a0idn\u2028.org"):
        with pytest.raises(DnsNotFound) as info:
            await resolver.mx(name)
        assert info.value.nxdomain
        assert "invalid name" in info.value.reason


def test_errors_carry_what_was_asked() -> None:
    err = DnsTempError("example.org", "MX", "timeout")
    assert (err.name, err.rdtype, err.reason) == ("example.org", "MX", "timeout")
    assert str(err) == "example.org MX: timeout"
    nf = DnsNotFound("example.org", "A", "NXDOMAIN", nxdomain=True)
    assert nf.nxdomain and isinstance(nf, Exception)


def test_record_helpers() -> None:
    assert MxRecord(0, ".").is_null and not MxRecord(0, "mx.example.org").is_null
    txt = TxtRecord((b"v=spf1 ", b"-all"))
    assert txt.joined == b"v=spf1 -all" and txt.text == "v=spf1 -all"
    assert TxtRecord((b"\xff",)).text == "\ufffd"


# -- the cache ---------------------------------------------------------------------------------


def key(name: str, rdtype: int = 15) -> tuple[dns.name.Name, int]:
    return (dns.name.from_text(name), rdtype)


def answer(name: str) -> Answer[str]:
    return Answer(name, ("x",), 60, name)


def test_cache_expires_entries_by_ttl() -> None:
    clock = FakeClock()
    cache = DnsCache(10, clock)
    cache.put(key("a.example"), answer("a"), 30)
    clock.advance(29.9)
    assert cache.get(key("a.example")) == answer("a")
    clock.advance(0.1)
    assert cache.get(key("a.example")) is None
    assert len(cache) == 0


def test_cache_keys_ignore_case_and_separate_types() -> None:
    cache = DnsCache(10, FakeClock())
    cache.put(key("A.Example"), answer("a"), 30)
    assert cache.get(key("a.example")) == answer("a")
    assert cache.get(key("a.example", 16)) is None


def test_cache_evicts_least_recently_used() -> None:
    cache = DnsCache(2, FakeClock())
    cache.put(key("a.example"), answer("a"), 30)
    cache.put(key("b.example"), answer("b"), 30)
    cache.get(key("a.example"))  # a is now more recent than b
    cache.put(key("c.example"), answer("c"), 30)
    assert cache.get(key("b.example")) is None
    assert cache.get(key("a.example")) is not None and cache.get(key("c.example")) is not None


def test_cache_ignores_zero_ttl_and_zero_size() -> None:
    cache = DnsCache(2, FakeClock())
    cache.put(key("a.example"), answer("a"), 0)
    assert len(cache) == 0
    off = DnsCache(0, FakeClock())
    off.put(key("a.example"), answer("a"), 30)
    assert len(off) == 0
    cache.put(key("a.example"), answer("a"), 5)
    cache.clear()
    assert len(cache) == 0
