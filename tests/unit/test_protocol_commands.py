"""Argument parsing: hello names, paths, ESMTP parameters (MAIL/RCPT), BDAT. Table-driven."""

from __future__ import annotations

import dataclasses

import pytest

from postillon.core.address import Address
from postillon.core.envelope import BodyType, DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol.commands import (
    BdatCommand,
    parse_bdat,
    parse_hello,
    parse_mail,
    parse_rcpt,
    split_command,
)
from postillon.protocol.errors import ProtocolError
from postillon.protocol.settings import ServerSettings

SETTINGS = ServerSettings("mx.test", max_message_size=1000)
BARE = ServerSettings("mx.test", smtputf8=False, dsn=False, max_message_size=0)
AUTH = ServerSettings("mx.test", auth_mechanisms=("PLAIN",))


def refused(reply: Reply, fn: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.reply == reply


@pytest.mark.parametrize(
    ("line", "verb", "args"),
    [
        ("MAIL FROM:<a@b>", "MAIL", "FROM:<a@b>"),
        ("mail FROM:<a@b> ", "MAIL", "FROM:<a@b>"),
        ("NOOP", "NOOP", ""),
        ("noop   x", "NOOP", "x"),
        ("", "", ""),
        (" NOOP", "", "NOOP"),
        ("MAIL2 x", "", "x"),
        ("STARTTLS", "STARTTLS", ""),
    ],
)
def test_split_command(line: str, verb: str, args: str) -> None:
    assert split_command(line)[0] == verb
    if verb:
        assert split_command(line)[1] == args


@pytest.mark.parametrize(
    "name",
    [
        "client.test",
        "Client.Example.ORG",
        "localhost",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        # Not domains, but common in the wild; accepted like Postfix and Exim do.
        "bad_name.test",
        "-x.test",
        "a..b",
    ],
)
def test_hello_names(name: str) -> None:
    assert parse_hello(name) == name


@pytest.mark.parametrize(
    "args", ["", "a b", "[300.0.0.1]", "[1.2.3.4", "x" * 300, "caf\u00e9.test", "a\x01b"]
)
def test_bad_hello_names(args: str) -> None:
    refused(R.HELLO_SYNTAX, parse_hello, args)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("0", BdatCommand(0, False)),
        ("0 LAST", BdatCommand(0, True)),
        ("1000 last", BdatCommand(1000, True)),
        ("00012", BdatCommand(12, False)),
    ],
)
def test_bdat(args: str, expected: BdatCommand) -> None:
    assert parse_bdat(args) == expected


@pytest.mark.parametrize("args", ["", "x", "-1", "1 FIRST", "1 LAST x", "1  LAST", "1" * 21, "½"])
def test_bad_bdat(args: str) -> None:
    refused(R.BDAT_SYNTAX, parse_bdat, args)


# --- MAIL ----------------------------------------------------------------------------

MAIL_OK = [
    ("FROM:<a@example.org>", Address("a", "example.org"), MailParams()),
    ("from:<a@EXAMPLE.org>", Address("a", "example.org"), MailParams()),
    ("FROM: <a@example.org>", Address("a", "example.org"), MailParams()),
    ("FROM:<>", None, MailParams()),
    ("FROM:<@hop.example:a@example.org>", Address("a", "example.org"), MailParams()),
    ('FROM:<"a b>c"@example.org>', Address('"a b>c"', "example.org"), MailParams()),
    ("FROM:<a@example.org> SIZE=1000", Address("a", "example.org"), MailParams(size=1000)),
    (
        "FROM:<a@example.org> BODY=8bitmime",
        Address("a", "example.org"),
        MailParams(body=BodyType.EIGHT_BIT_MIME),
    ),
    (
        "FROM:<a@example.org> BODY=7BIT size=5",
        Address("a", "example.org"),
        MailParams(size=5, body=BodyType.SEVEN_BIT),
    ),
    (
        "FROM:<jürgen@bücher.example> SMTPUTF8",
        Address("jürgen", "bücher.example"),
        MailParams(smtputf8=True),
    ),
    (
        "FROM:<a@example.org> RET=full ENVID=QQ314159+2Bx+3D",
        Address("a", "example.org"),
        MailParams(ret=DsnRet.FULL, envid="QQ314159+x="),
    ),
    ("FROM:<> RET=HDRS", None, MailParams(ret=DsnRet.HDRS)),
]


@pytest.mark.parametrize(("args", "sender", "params"), MAIL_OK)
def test_mail(args: str, sender: Address | None, params: MailParams) -> None:
    assert parse_mail(args, SETTINGS) == (sender, params)


MAIL_REFUSED = [
    ("", R.PARAM_SYNTAX),
    ("TO:<a@example.org>", R.PARAM_SYNTAX),
    ("FROM:a@example.org", R.BAD_SENDER),
    ("FROM:<a@example.org", R.BAD_SENDER),
    ("FROM:<a@example.org>x", R.BAD_SENDER),
    ("FROM:<a>", R.BAD_SENDER),
    ("FROM:<a@@example.org>", R.BAD_SENDER),
    ("FROM:<a@example.org%b@c.example>", R.BAD_SENDER),
    ("FROM:<Postmaster>", R.BAD_SENDER),  # only RCPT may omit the domain
    ("FROM:<" + "a" * 65 + "@example.org>", R.BAD_SENDER),
    ("FROM:<jürgen@bücher.example>", R.NEEDS_SMTPUTF8),
    ("FROM:<a@example.org> SIZE=1001", R.MESSAGE_TOO_BIG),
    ("FROM:<a@example.org> SIZE=", R.BAD_PARAM),
    ("FROM:<a@example.org> SIZE=1e3", R.BAD_PARAM),
    ("FROM:<a@example.org> SIZE=\uff11", R.BAD_PARAM),  # a full-width digit is not a digit here
    ("FROM:<a@example.org> SIZE=1 SIZE=1", R.BAD_PARAM),
    ("FROM:<a@example.org> BODY=BINARYMIME", R.BAD_PARAM),
    ("FROM:<a@example.org> BODY", R.BAD_PARAM),
    ("FROM:<a@example.org> SMTPUTF8=1", R.BAD_PARAM),
    ("FROM:<a@example.org> RET=SOME", R.BAD_PARAM),
    ("FROM:<a@example.org> ENVID=", R.BAD_PARAM),
    ("FROM:<a@example.org> ENVID=a+4", R.BAD_PARAM),
    ("FROM:<a@example.org> ENVID=a+4g", R.BAD_PARAM),
    ("FROM:<a@example.org> ENVID=" + "x" * 101, R.BAD_PARAM),
    ("FROM:<a@example.org> AUTH=<>", R.BAD_PARAM),  # no AUTH offered
    ("FROM:<a@example.org> X-UNKNOWN", R.BAD_PARAM),
    ("FROM:<a@example.org> -X=1", R.BAD_PARAM),
    ("FROM:<a@example.org> X=a=b", R.BAD_PARAM),
]


@pytest.mark.parametrize(("args", "reply"), MAIL_REFUSED)
def test_mail_refused(args: str, reply: Reply) -> None:
    refused(reply, parse_mail, args, SETTINGS)


@pytest.mark.parametrize(
    "args",
    ["FROM:<a@b.example> SMTPUTF8", "FROM:<a@b.example> RET=FULL", "FROM:<a@b.example> ENVID=x"],
)
def test_mail_params_not_offered(args: str) -> None:
    refused(R.BAD_PARAM, parse_mail, args, BARE)


def test_mail_size_without_limit() -> None:
    assert parse_mail("FROM:<a@b.example> SIZE=99999999999999", BARE)[1].size == 99999999999999


def test_mail_auth_param_when_offered() -> None:
    assert parse_mail("FROM:<a@b.example> AUTH=<>", AUTH)[1].auth == "<>"
    assert parse_mail("FROM:<a@b.example> AUTH=e+2Bf@b.example", AUTH)[1].auth == "e+f@b.example"


def test_mail_requiretls_only_over_tls() -> None:
    """RFC 8689 §2: REQUIRETLS is accepted once TLS is up, refused with 530 5.7.10
    before; it takes no value; a listener or LMTP without it does not know it."""
    args = "FROM:<a@b.example> REQUIRETLS"
    assert parse_mail(args, SETTINGS, tls_active=True)[1].requiretls is True
    assert parse_mail("FROM:<a@b.example>", SETTINGS, tls_active=True)[1].requiretls is False
    refused(R.REQUIRETLS_NEEDS_TLS, parse_mail, args, SETTINGS)
    refused(R.REQUIRETLS_NEEDS_TLS, parse_mail, args, SETTINGS, tls_active=False)
    refused(R.BAD_PARAM, parse_mail, args + "=1", SETTINGS, tls_active=True)
    off = dataclasses.replace(SETTINGS, requiretls=False)
    refused(R.BAD_PARAM, parse_mail, args, off, tls_active=True)
    lmtp = dataclasses.replace(SETTINGS, lmtp=True)
    refused(R.BAD_PARAM, parse_mail, args, lmtp, tls_active=True)


# --- RCPT ----------------------------------------------------------------------------

RCPT_OK = [
    ("TO:<b@example.com>", False, Address("b", "example.com"), RcptParams()),
    ("to:<Postmaster>", False, Address("Postmaster", ""), RcptParams()),
    ("TO:<POSTMASTER>", False, Address("Postmaster", ""), RcptParams()),
    ("TO:<@a.example,@b.example:c@example.com>", False, Address("c", "example.com"), RcptParams()),
    ("TO:<用户@例子.测试>", True, Address("用户", "例子.测试"), RcptParams()),
    (
        "TO:<b@example.com> NOTIFY=success,DELAY",
        False,
        Address("b", "example.com"),
        RcptParams(notify=frozenset({"SUCCESS", "DELAY"})),
    ),
    (
        "TO:<b@example.com> NOTIFY=NEVER ORCPT=rfc822;b+40example.com",
        False,
        Address("b", "example.com"),
        RcptParams(notify=frozenset({"NEVER"}), orcpt="rfc822;b@example.com"),
    ),
    (
        "TO:<b@example.com> ORCPT=utf-8;b\\x{40}example.com",
        False,
        Address("b", "example.com"),
        RcptParams(orcpt="utf-8;b\\x{40}example.com"),
    ),
]


@pytest.mark.parametrize(("args", "utf8", "rcpt", "params"), RCPT_OK)
def test_rcpt(args: str, utf8: bool, rcpt: Address, params: RcptParams) -> None:
    assert parse_rcpt(args, SETTINGS, smtputf8=utf8) == (rcpt, params)


RCPT_REFUSED = [
    ("", R.PARAM_SYNTAX),
    ("FROM:<b@example.com>", R.PARAM_SYNTAX),
    ("TO:<>", R.BAD_RECIPIENT),
    ("TO:b@example.com", R.BAD_RECIPIENT),
    ("TO:<b>", R.BAD_RECIPIENT),
    ("TO:<b@example.com>>", R.BAD_RECIPIENT),
    ("TO:<@a.example:>", R.BAD_RECIPIENT),
    ("TO:<用户@例子.测试>", R.NEEDS_SMTPUTF8),
    ("TO:<b@example.com> NOTIFY=NEVER,DELAY", R.BAD_PARAM),
    ("TO:<b@example.com> NOTIFY=", R.BAD_PARAM),
    ("TO:<b@example.com> NOTIFY", R.BAD_PARAM),
    ("TO:<b@example.com> NOTIFY=ALWAYS", R.BAD_PARAM),
    ("TO:<b@example.com> NOTIFY=NEVER NOTIFY=NEVER", R.BAD_PARAM),
    ("TO:<b@example.com> ORCPT=rfc822", R.BAD_PARAM),
    ("TO:<b@example.com> ORCPT=rfc822;", R.BAD_PARAM),
    ("TO:<b@example.com> ORCPT=;b@example.com", R.BAD_PARAM),
    ("TO:<b@example.com> ORCPT=rfc822;b+4", R.BAD_PARAM),
    ("TO:<b@example.com> ORCPT=rfc822;" + "x" * 501, R.BAD_PARAM),
    ("TO:<b@example.com> SIZE=1", R.BAD_PARAM),
]


@pytest.mark.parametrize(("args", "reply"), RCPT_REFUSED)
def test_rcpt_refused(args: str, reply: Reply) -> None:
    refused(reply, parse_rcpt, args, SETTINGS, smtputf8=False)


def test_rcpt_dsn_not_offered() -> None:
    refused(R.BAD_PARAM, parse_rcpt, "TO:<b@example.com> NOTIFY=NEVER", BARE, smtputf8=False)


def test_every_refusal_carries_an_enhanced_status() -> None:
    replies = [v for v in vars(R).values() if isinstance(v, Reply)]
    assert replies
    for reply in replies:
        assert reply.status is not None, reply
        assert reply.status[0] == str(reply.code)[0]
    assert dataclasses.is_dataclass(R.chunk_received(1))
