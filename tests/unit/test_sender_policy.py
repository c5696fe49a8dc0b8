"""Sender policy: an authenticated user sends only as its own addresses."""

from __future__ import annotations

import pytest

from postillon.checks.sender_policy import (
    FROM_HEADER_NOT_OWNED,
    MAIL_FROM_NOT_OWNED,
    address_owned,
    check_from_header,
    check_mail_from,
    from_header_values,
)
from postillon.config.loader import ConfigError, parse_config
from postillon.core.account import Account

ALICE = Account("alice@example.com", ("alice@example.com", "*@team.example", "bob@Bücher.example"))


@pytest.mark.parametrize(
    ("address", "owned"),
    [
        ("alice@example.com", True),
        ("Alice@EXAMPLE.COM", True),  # local part and domain case-insensitive
        ("alice@example.com.", True),  # trailing dot
        ('"alice"@example.com', True),  # quoting removed
        ("anyone@team.example", True),  # *@domain
        ("x@TEAM.example", True),
        ("alice@sub.team.example", False),  # * covers one domain, not subdomains
        ("bob@xn--bcher-kva.example", True),  # IDNA: U-label entry, A-label address
        ("bob@bücher.example", True),
        ("mallory@example.com", False),
        ("alice@example.org", False),
        ("alice+tag@example.com", False),  # no delimiter configured
        ("", False),
        ("alice", False),
        ("*@example.com", False),  # a literal "*" is not a wildcard in the address
    ],
)
def test_address_owned(address: str, owned: bool) -> None:
    assert address_owned(ALICE, address) is owned


def test_recipient_delimiter_variant() -> None:
    assert address_owned(ALICE, "alice+lists@example.com", "+")
    assert not address_owned(ALICE, "mallory+alice@example.com", "+")


def test_mail_from_modes() -> None:
    assert check_mail_from(ALICE, "mallory@example.com", "off").allowed
    warn = check_mail_from(ALICE, "mallory@example.com", "warn")
    assert warn.allowed and warn.reply is None
    assert warn.warning and "mallory@example.com" in warn.warning
    enforce = check_mail_from(ALICE, "mallory@example.com", "enforce")
    assert not enforce.allowed
    assert enforce.reply == MAIL_FROM_NOT_OWNED
    assert enforce.reply.to_bytes() == b"553 5.7.1 Sender address not owned by user\r\n"
    ok = check_mail_from(ALICE, "ALICE@example.com", "enforce")
    assert ok.allowed and ok.warning is None


def test_null_sender_allowed_at_mail() -> None:
    assert check_mail_from(ALICE, "", "enforce").allowed


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        (["Alice <alice@example.com>"], True),
        (['"Alice Example" <ALICE@Example.com>'], True),
        (["alice@example.com, team <x@team.example>"], True),
        (['"alice@example.com" <mallory@evil.test>'], False),  # display name is not the address
        (["alice@example.com, mallory@evil.test"], False),  # every address must be owned
        (["Alice <alice@example.com>", "Mallory <mallory@evil.test>"], False),  # two From:
        (["undisclosed"], False),  # no address at all
        ([], True),  # no From: at all is another check's business
        (["  "], True),
    ],
)
def test_from_header_enforce(values: list[str], allowed: bool) -> None:
    decision = check_from_header(ALICE, values, "enforce")
    assert decision.allowed is allowed
    if not allowed:
        assert decision.reply == FROM_HEADER_NOT_OWNED
        assert decision.reply.code == 550 and decision.reply.status == "5.7.1"
        assert decision.warning


def test_from_header_warn_and_off() -> None:
    warn = check_from_header(ALICE, ["mallory@evil.test"], "warn")
    assert warn.allowed and warn.reply is None and warn.warning
    assert "<mallory@evil.test>" in warn.warning and "alice@example.com" in warn.warning
    assert check_from_header(ALICE, ["mallory@evil.test"], "off") == check_from_header(
        ALICE, [], "enforce"
    )


def test_submission_config_defaults_and_errors_name_the_key() -> None:
    sub = parse_config({}).submission
    assert sub.sender_policy == "enforce"
    assert (sub.messages_per_hour, sub.recipients_per_hour, sub.ip_messages_per_hour) == (
        500,
        2000,
        1000,
    )
    assert sub.hide_client_ip is True and sub.accounts_file is None
    assert parse_config({"submission": {"sender_policy": "warn"}}).submission.sender_policy == (
        "warn"
    )
    with pytest.raises(ConfigError, match=r"x.toml: submission.sender_policy"):
        parse_config({"submission": {"sender_policy": "strict"}}, "x.toml")
    with pytest.raises(ConfigError, match=r"submission.messages_per_hour"):
        parse_config({"submission": {"messages_per_hour": -1}}, "x.toml")


def test_from_header_values_from_header_block() -> None:
    block = (
        b"Received: from x\r\n\tby y\r\nFrom: =?utf-8?q?Al=C3=AFce?=\r\n <alice@example.com>\r\n"
        b"Subject: hi\r\nfrom: second@evil.test\r\n\r\n"
    )
    values = from_header_values(block)
    assert len(values) == 2 and "alice@example.com" in values[0] and "Alïce" in values[0]
    assert not check_from_header(ALICE, values, "enforce").allowed
    assert check_from_header(ALICE, values[:1], "enforce").allowed
    assert from_header_values(b"Subject: none\r\n\r\n") == []
