"""``[[milter]]``: the keys the issue names, their defaults, and errors that name the key."""

from __future__ import annotations

import tomllib

import pytest

from postillon.checks.context import (
    ClientFacts,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.milter_check import build
from postillon.checks.milter_macros import known_macros, stage_macros
from postillon.config.loader import parse_config
from postillon.config.milter import parse_milter_address
from postillon.config.model import ConfigError
from postillon.protocol.milter_wire import Stage


def test_keys_and_defaults() -> None:
    config = parse_config(
        tomllib.loads(
            """
            [[milter]]
            name = "rspamd"
            address = "inet:127.0.0.1:11332"

            [[milter]]
            name = "clamav"
            address = "unix:/run/clamav/milter.sock"
            listeners = ["smtp", "submission"]
            timeout = 5
            default_action = "accept"
            """
        )
    )
    rspamd, clamav = config.milter
    assert (rspamd.listeners, rspamd.timeout, rspamd.default_action) == (
        ("smtp",),
        30.0,
        "tempfail",
    )
    assert (clamav.listeners, clamav.timeout, clamav.default_action) == (
        ("smtp", "submission"),
        5.0,
        "accept",
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('name = "a"\naddress = "tcp:1.2.3.4:5"', "address"),
        ('name = "a"\naddress = "inet:127.0.0.1:0"', "address"),
        ('name = "a"\naddress = "unix:relative"', "address"),
        ('name = "a"\naddress = "inet:127.0.0.1:1"\ndefault_action = "drop"', "default_action"),
        ('name = "a"\naddress = "inet:127.0.0.1:1"\ntimeout = 0', "timeout"),
        ('name = "a"\naddress = "inet:127.0.0.1:1"\nlisteners = ["imap"]', "listeners"),
        ('name = "a b"\naddress = "inet:127.0.0.1:1"', "name"),
    ],
)
def test_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"milter.*{key}"):
        parse_config(tomllib.loads("[[milter]]\n" + text))


def test_names_are_unique() -> None:
    text = '[[milter]]\nname = "a"\naddress = "inet:127.0.0.1:1"\n' * 2
    with pytest.raises(ConfigError, match="used twice"):
        parse_config(tomllib.loads(text))


def test_address_spellings() -> None:
    assert parse_milter_address("inet:127.0.0.1:11332") == ("inet", "127.0.0.1", 11332)
    assert parse_milter_address("inet:11332@127.0.0.1") == ("inet", "127.0.0.1", 11332)
    assert parse_milter_address("inet6:[::1]:8891") == ("inet", "::1", 8891)
    assert parse_milter_address("local:/run/x.sock") == ("unix", "/run/x.sock", 0)


def test_built_only_for_its_listener_kinds() -> None:
    class Parts:
        config = parse_config(
            tomllib.loads('[[milter]]\nname = "a"\naddress = "inet:127.0.0.1:1"\n')
        )

    assert build("smtp", Parts()) is not None  # type: ignore[arg-type]
    assert build("submission", Parts()) is None  # type: ignore[arg-type]


def test_macros_from_the_session() -> None:
    s = SessionContext(
        "S", ClientFacts(ip="192.0.2.1", port=25000, rdns="", helo="h", listener="smtp:x")
    )
    tx = TransactionContext(sender="a@example.net", queue_id="Q1")
    known = known_macros(s, "mx.example.org", tx)
    assert stage_macros(Stage.CONNECT, known)["_"] == "unknown [192.0.2.1]"
    assert stage_macros(Stage.CONNECT, known)["{client_resolve}"] == "FAIL"
    assert stage_macros(Stage.ENVFROM, known) == {
        "i": "Q1",
        "{mail_addr}": "a@example.net",
        "{mail_host}": "example.net",
    }
    assert "{tls_version}" not in known  # plaintext: not sent at all


def test_session_macros_follow_the_client_facts() -> None:
    """The client's macros are built once per ClientFacts and again when it is replaced
    (HELO, STARTTLS, AUTH); transaction values never leak into the session's part."""
    import dataclasses

    from postillon.checks.milter_macros import SessionMacros

    s = SessionContext("S", ClientFacts(ip="192.0.2.1", port=25000, listener="smtp:x"))
    macros = SessionMacros("mx.example.org")
    first = macros.known(s)
    assert macros.known(s) is first  # not rebuilt while the facts are the same
    assert first == known_macros(s, "mx.example.org")
    tx = TransactionContext(sender="a@example.net", queue_id="Q1")
    rcpt = RecipientFacts("b@example.org")
    assert macros.known(s, tx, rcpt) == known_macros(s, "mx.example.org", tx, rcpt)
    assert "{mail_addr}" not in macros.known(s)
    s.client = dataclasses.replace(s.client, helo="client.example", tls_version="TLSv1.3")
    again = macros.known(s)
    assert again is not first and again["s"] == "client.example"
    assert again["{tls_version}"] == "TLSv1.3"
