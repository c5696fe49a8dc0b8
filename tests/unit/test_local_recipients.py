"""Local recipient resolution: mailboxes, aliases, sub-addressing, catch-all, postmaster.

Each case is an RCPT TO path as a client sends it (parsed with ``parse_path``, so the
address is exactly what the session hands to ``resolve``) and the expected answer:
a tuple of final targets, or the rejecting (code, enhanced status).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postillon.config.model import DomainConfig
from postillon.core.address import Address, parse_path
from postillon.core.reply import Reply
from postillon.routing.aliases import AliasesError
from postillon.routing.local import (
    MAX_ALIAS_DEPTH,
    LocalRecipients,
    RecipientAccepted,
    RecipientRejected,
    is_safe_local_part,
)

# Named expected rejections (aiosmtpd statuscodes habit).
UNKNOWN = (550, "5.1.1")
LOOP = (550, "5.4.6")
NOT_LOCAL = (550, "5.1.2")

Expected = tuple[str, ...] | tuple[int, str]

DOMAINS = (
    DomainConfig(
        name="example.org",
        mailboxes=("alice", "bob", "Carol", "archive"),
        aliases={
            "sales": ("alice", "bob"),
            "info": ("sales",),  # alias of an alias
            "both": ("sales", "alice", "bob"),  # duplicates collapse
            "ext": ("bob@remote.test",),  # remote target
            "mixed": ("alice", "Bob@Remote.TEST"),
            "Office": ("carol",),  # configured name in upper case
            "alice+special": ("bob",),  # full local part wins over the base
            "cross": ("erin@example.net",),  # another local domain, resolved again
            "cross-alias": ("team@example.net",),
            "keep": ("alice", "archive@remote.test", "alice"),
            "selfish": ("selfish", "bob"),  # names itself, no mailbox: a loop
            "carol": ("carol", "archive"),  # names itself: carol's mailbox + archive
            "ping": ("pong",),
            "pong": ("ping",),  # ping <-> pong
            "tri1": ("tri2",),
            "tri2": ("tri3",),
            "tri3": ("alice", "tri1"),  # a loop behind a good target: still a loop
            "void": (),  # expanded to nothing (only unsupported targets were given)
            "ghosts": ("ghost1", "ghost2"),  # names nobody
            "partly": ("alice", "ghost"),  # one good, one unknown
            "direct": ("\\alice",),
            "quoted": ('"bob"',),
            "percent": ("bob%remote.test",),  # never routes, even from an alias
            "tagged": ("alice+fromalias",),
        },
    ),
    DomainConfig(
        name="example.net",
        mailboxes=("erin", "frank"),
        catch_all="erin",
        aliases={"team": ("erin", "frank"), "postmaster": ("frank",), "root": ("frank",)},
    ),
    DomainConfig(name="catch.test", catch_all="alice@example.org"),
    DomainConfig(name="remote-catch.test", catch_all="someone@remote.test"),
    DomainConfig(
        name="alias-catch.test",
        mailboxes=("gina",),
        catch_all="all",
        aliases={"all": ("gina", "x@remote.test")},
    ),
    DomainConfig(name="bad-catch.test", catch_all="nobody"),
    DomainConfig(name="bücher.example", mailboxes=("jörg",)),
)

GLOBAL_ALIASES: dict[str, tuple[str, ...]] = {
    "hostmaster": ("postmaster",),  # bare name: postmaster of the domain being resolved
    "root": ("alice@example.org",),
    "abuse": ("postmaster", "abuse@remote.test"),
}


@pytest.fixture(scope="module")
def local() -> LocalRecipients:
    return LocalRecipients(DOMAINS, GLOBAL_ALIASES, hostname="mx.example.org")


def _address(path: str) -> Address:
    address = parse_path(path, allow_postmaster=True, smtputf8=True)
    assert address is not None
    return address


CASES: list[tuple[str, str, Expected]] = [
    # mailboxes
    ("mailbox", "<alice@example.org>", ("alice@example.org",)),
    ("unknown", "<nobody@example.org>", UNKNOWN),
    ("local part case", "<ALICE@example.org>", ("alice@example.org",)),
    ("domain case", "<alice@EXAMPLE.Org>", ("alice@example.org",)),
    ("configured upper case", "<carol@example.org>", ("carol@example.org", "archive@example.org")),
    ("quoted local part", '<"alice"@example.org>', ("alice@example.org",)),
    ("quoted with escape", '<"al\\ice"@example.org>', ("alice@example.org",)),
    ("quoted with space", '<"alice "@example.org>', UNKNOWN),
    ("idn domain and utf-8 local", "<JÖRG@bücher.example>", ("jörg@bücher.example",)),
    ("idn a-label", "<jörg@xn--bcher-kva.example>", ("jörg@bücher.example",)),
    # relay tricks never match and never relay
    ("percent hack", "<bob%remote.test@example.org>", UNKNOWN),
    ("bang path", "<remote.test!bob@example.org>", UNKNOWN),
    ("quoted at", '<"bob@remote.test"@example.org>', UNKNOWN),
    ("quoted slash", '<"../alice"@example.org>', UNKNOWN),
    ("quoted dot", '<"."@example.org>', UNKNOWN),
    ("quoted dot dot", '<".."@example.org>', UNKNOWN),
    ("quoted backslash", '<"a\\\\b"@example.org>', UNKNOWN),
    ("percent hack with catch-all", "<bob%remote.test@example.net>", UNKNOWN),
    ("source route ignored", "<@relay.test:alice@example.org>", ("alice@example.org",)),
    # sub-addressing
    ("tag", "<alice+news@example.org>", ("alice@example.org",)),
    ("tag upper case", "<Alice+News@example.org>", ("alice@example.org",)),
    ("two delimiters", "<alice+a+b@example.org>", ("alice@example.org",)),
    ("full local part first", "<alice+special@example.org>", ("bob@example.org",)),
    ("tag on alias", "<sales+q3@example.org>", ("alice@example.org", "bob@example.org")),
    ("empty base", "<+tag@example.org>", UNKNOWN),
    ("tag on unknown", "<nobody+x@example.org>", UNKNOWN),
    ("tag in alias target", "<tagged@example.org>", ("alice@example.org",)),
    # catch-all
    ("catch-all", "<anything@example.net>", ("erin@example.net",)),
    ("mailbox before catch-all", "<frank@example.net>", ("frank@example.net",)),
    ("catch-all with tag", "<frank+x@example.net>", ("frank@example.net",)),
    ("catch-all to other domain", "<whoever@catch.test>", ("alice@example.org",)),
    ("catch-all to remote", "<whoever@remote-catch.test>", ("someone@remote.test",)),
    (
        "catch-all via alias",
        "<whoever@alias-catch.test>",
        ("gina@alias-catch.test", "x@remote.test"),
    ),
    ("catch-all naming nothing", "<whoever@bad-catch.test>", UNKNOWN),
    ("catch-all target has no second catch-all", "<nobody@bad-catch.test>", UNKNOWN),
    # postmaster (RFC 5321 4.5.1)
    ("postmaster not configured", "<postmaster@example.org>", ("postmaster@example.org",)),
    ("postmaster any case", "<PostMaster@Example.org>", ("postmaster@example.org",)),
    ("postmaster with tag", "<postmaster+x@example.org>", ("postmaster@example.org",)),
    ("postmaster without domain", "<Postmaster>", ("postmaster@example.org",)),
    ("postmaster without domain, lower", "<postmaster>", ("postmaster@example.org",)),
    ("postmaster aliased in domain", "<postmaster@example.net>", ("frank@example.net",)),
    ("postmaster beats catch-all", "<postmaster@catch.test>", ("postmaster@catch.test",)),
    ("postmaster of empty domain", "<postmaster@bad-catch.test>", ("postmaster@bad-catch.test",)),
    # global aliases apply in every local domain; the domain's own aliases first
    ("global alias, bare target", "<hostmaster@catch.test>", ("postmaster@catch.test",)),
    ("global alias in other domain", "<hostmaster@example.net>", ("frank@example.net",)),
    ("global alias to local address", "<root@example.org>", ("alice@example.org",)),
    ("domain alias before global", "<root@example.net>", ("frank@example.net",)),
    ("global alias, mixed", "<abuse@example.org>", ("postmaster@example.org", "abuse@remote.test")),
    # alias targets
    ("alias to mailboxes", "<sales@example.org>", ("alice@example.org", "bob@example.org")),
    ("alias chain", "<info@example.org>", ("alice@example.org", "bob@example.org")),
    (
        "duplicates collapse, order kept",
        "<both@example.org>",
        ("alice@example.org", "bob@example.org"),
    ),
    ("alias to remote", "<ext@example.org>", ("bob@remote.test",)),
    ("remote keeps local case", "<mixed@example.org>", ("alice@example.org", "Bob@remote.test")),
    ("alias name case", "<OFFICE@example.org>", ("carol@example.org", "archive@example.org")),
    ("alias to other local domain", "<cross@example.org>", ("erin@example.net",)),
    (
        "alias to alias in other domain",
        "<cross-alias@example.org>",
        ("erin@example.net", "frank@example.net"),
    ),
    ("alias naming itself", "<keep@example.org>", ("alice@example.org", "archive@remote.test")),
    ("alias to \\mailbox", "<direct@example.org>", ("alice@example.org",)),
    ("alias to quoted name", "<quoted@example.org>", ("bob@example.org",)),
    ("alias with an unknown target", "<partly@example.org>", ("alice@example.org",)),
    # broken tables
    ("loop of two", "<ping@example.org>", LOOP),
    ("loop of three behind a good target", "<tri1@example.org>", LOOP),
    ("self loop without mailbox", "<selfish@example.org>", LOOP),
    ("expands to nothing", "<void@example.org>", UNKNOWN),
    ("all targets unknown", "<ghosts@example.org>", UNKNOWN),
    ("alias target with percent hack", "<percent@example.org>", UNKNOWN),
    # the machine's own name is an alias of the first domain
    ("hostname", "<alice@mx.example.org>", ("alice@example.org",)),
    ("hostname postmaster", "<postmaster@MX.example.org>", ("postmaster@example.org",)),
    ("hostname unknown", "<nobody@mx.example.org>", UNKNOWN),
    # not ours
    ("remote domain", "<bob@remote.test>", NOT_LOCAL),
    ("subdomain is not local", "<alice@sub.example.org>", NOT_LOCAL),
    ("address literal", "<alice@[192.0.2.1]>", NOT_LOCAL),
]


@pytest.mark.parametrize(("path", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resolve(local: LocalRecipients, path: str, expected: Expected) -> None:
    result = local.resolve(_address(path))
    if isinstance(expected[0], int):
        assert isinstance(result, RecipientRejected), result
        assert (result.reply.code, result.reply.status) == expected
        assert result.detail
    else:
        assert isinstance(result, RecipientAccepted), result
        assert result.targets == expected
        for target in result.targets:  # local targets are real mailboxes for delivery
            if local.is_local_domain(target.rpartition("@")[2]):
                assert local.mailbox_exists(target), target


def test_unknown_reply_text(local: LocalRecipients) -> None:
    result = local.resolve(Address("x", "example.org"))
    assert result == RecipientRejected(
        Reply.of(
            550,
            "5.1.1",
            "<x@example.org>: Recipient address rejected: User unknown in local recipient table",
        ),
        result.detail if isinstance(result, RecipientRejected) else "",
    )


def test_loop_reply_text_and_detail(local: LocalRecipients) -> None:
    result = local.resolve(Address("ping", "example.org"))
    assert isinstance(result, RecipientRejected)
    assert result.reply == Reply.of(
        550, "5.4.6", "<ping@example.org>: Recipient address rejected: alias loop"
    )
    assert "ping@example.org -> pong@example.org -> ping@example.org" in result.detail


def test_reply_shows_address_as_given(local: LocalRecipients) -> None:
    result = local.resolve(_address('<"bob@remote.test"@example.org>'))
    assert isinstance(result, RecipientRejected)
    assert result.reply.text.startswith('<"bob@remote.test"@example.org>: ')


def test_dropped_targets_are_reported(local: LocalRecipients) -> None:
    result = local.resolve(Address("partly", "example.org"))
    assert result == RecipientAccepted(("alice@example.org",), ("ghost@example.org",))
    rejected = local.resolve(Address("ghosts", "example.org"))
    assert isinstance(rejected, RecipientRejected)
    assert "ghost1@example.org" in rejected.detail and "ghost2@example.org" in rejected.detail


def _chain(length: int) -> LocalRecipients:
    aliases: dict[str, tuple[str, ...]] = {f"a{i}": (f"a{i + 1}",) for i in range(length - 1)}
    aliases[f"a{length - 1}"] = ("alice",)
    return LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice",), aliases=aliases)], {}, hostname="h"
    )


def test_depth_limit() -> None:
    ok = _chain(MAX_ALIAS_DEPTH).resolve(Address("a0", "example.org"))
    assert ok == RecipientAccepted(("alice@example.org",))
    too_deep = _chain(MAX_ALIAS_DEPTH + 1).resolve(Address("a0", "example.org"))
    assert isinstance(too_deep, RecipientRejected)
    assert (too_deep.reply.code, too_deep.reply.status) == LOOP
    assert "deeper than 20" in too_deep.detail


def test_diamond_is_not_a_loop_and_does_not_explode() -> None:
    # Each level names the next level twice: 2**30 paths, but every alias expands once.
    aliases: dict[str, tuple[str, ...]] = {
        f"l{i}": (f"l{i + 1}", f"l{i + 1}@example.org") for i in range(15)
    }
    aliases["l15"] = ("alice",)
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice",), aliases=aliases)], {}, hostname="h"
    )
    assert local.resolve(Address("l0", "example.org")) == RecipientAccepted(("alice@example.org",))


def test_global_alias_before_mailbox() -> None:
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice", "bob"))],
        {"alice": ("bob",)},
        hostname="h",
    )
    assert local.resolve(Address("alice", "example.org")) == RecipientAccepted(("bob@example.org",))


def test_global_postmaster_alias() -> None:
    local = LocalRecipients(
        [
            DomainConfig(name="a.test", mailboxes=("ops",)),
            DomainConfig(name="b.test", mailboxes=("ops",)),
        ],
        {"postmaster": ("ops",)},
        hostname="h",
    )
    assert local.resolve(Address("postmaster", "b.test")) == RecipientAccepted(("ops@b.test",))
    assert local.resolve(Address("Postmaster", "")) == RecipientAccepted(("ops@a.test",))


def test_global_verbatim_self_reference() -> None:
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("root", "alice"))],
        {"root": ("\\root", "alice")},
        hostname="h",
    )
    assert local.resolve(Address("root", "example.org")) == RecipientAccepted(
        ("root@example.org", "alice@example.org")
    )


@pytest.mark.parametrize(
    ("delimiter", "local_part", "expected"),
    [
        ("+", "alice+x", ("alice@example.org",)),
        ("+", "alice-x", UNKNOWN),
        ("", "alice+x", UNKNOWN),
        ("+-", "alice-x", ("alice@example.org",)),
        ("+-", "alice-x+y", ("alice@example.org",)),
        ("-", "alice+x", UNKNOWN),
    ],
)
def test_recipient_delimiter(delimiter: str, local_part: str, expected: Expected) -> None:
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice",))],
        {},
        recipient_delimiter=delimiter,
        hostname="h",
    )
    result = local.resolve(Address(local_part, "example.org"))
    if isinstance(expected[0], int):
        assert isinstance(result, RecipientRejected)
        assert (result.reply.code, result.reply.status) == expected
    else:
        assert result == RecipientAccepted(tuple(str(t) for t in expected))


def test_no_domains_hostname_is_the_domain() -> None:
    local = LocalRecipients([], {"root": ("admin@remote.test",)}, hostname="Mail.Example.")
    assert local.is_local_domain("mail.example")
    assert local.resolve(Address("Postmaster", "")) == RecipientAccepted(
        ("postmaster@mail.example",)
    )
    assert local.resolve(Address("root", "mail.example")) == RecipientAccepted(
        ("admin@remote.test",)
    )
    assert local.mailbox_exists("postmaster@mail.example")
    unknown = local.resolve(Address("alice", "mail.example"))
    assert isinstance(unknown, RecipientRejected)


def test_no_domain_at_all() -> None:
    local = LocalRecipients([], {}, hostname="")
    assert not local.is_local_domain("")
    result = local.resolve(Address("Postmaster", ""))
    assert isinstance(result, RecipientRejected)
    assert result.reply.code == 550


IS_LOCAL: list[tuple[str, bool]] = [
    ("example.org", True),
    ("EXAMPLE.ORG", True),
    ("example.org.", True),
    ("xn--bcher-kva.example", True),
    ("BÜCHER.example", True),
    ("mx.example.org", True),
    ("remote.test", False),
    ("sub.example.org", False),
    ("", False),
    ("[192.0.2.1]", False),
    ("xn--invalid-\udcff", False),
]


@pytest.mark.parametrize(("domain", "expected"), IS_LOCAL)
def test_is_local_domain(local: LocalRecipients, domain: str, expected: bool) -> None:
    assert local.is_local_domain(domain) is expected


MAILBOX_EXISTS: list[tuple[str, bool]] = [
    ("alice@example.org", True),
    ("ALICE@Example.org", True),
    ("carol@example.org", True),
    ("postmaster@example.org", True),
    ("postmaster@catch.test", True),  # every local domain has one
    ("jörg@xn--bcher-kva.example", True),
    ("sales@example.org", False),  # an alias, not a mailbox
    ("erin@example.org", False),
    ("nobody@example.net", False),  # catch-all does not make mailboxes
    ("alice+tag@example.org", False),  # final targets carry no tag
    ("alice@mx.example.org", False),  # the hostname alias owns no mailboxes
    ("alice@remote.test", False),
    ("alice", False),
    ("../alice@example.org", False),
    ('"alice"@example.org', True),
]


@pytest.mark.parametrize(("address", "expected"), MAILBOX_EXISTS)
def test_mailbox_exists(local: LocalRecipients, address: str, expected: bool) -> None:
    assert local.mailbox_exists(address) is expected


@pytest.mark.parametrize(
    ("local_part", "safe"),
    [
        ("alice", True),
        ("alice.b", True),
        ("jörg", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a@b", False),
        ("a%b", False),
        ("a!b", False),
        ("a/b", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("a\x7fb", False),
    ],
)
def test_is_safe_local_part(local_part: str, safe: bool) -> None:
    assert is_safe_local_part(local_part) is safe


def test_unsupported_domain_alias_targets_warn() -> None:
    local = LocalRecipients(
        [
            DomainConfig(
                name="example.org",
                mailboxes=("alice",),
                aliases={"vac": ("|/bin/vacation", "alice")},
            )
        ],
        {"log": ("/var/log/x",)},
        hostname="h",
    )
    assert len(local.warnings) == 2
    assert local.resolve(Address("vac", "example.org")) == RecipientAccepted(("alice@example.org",))
    result = local.resolve(Address("log", "example.org"))
    assert isinstance(result, RecipientRejected) and result.reply.status == "5.1.1"


@pytest.mark.parametrize(
    ("domains", "aliases", "message"),
    [
        (
            [DomainConfig(name="example.org", aliases={"a": ("b c",)})],
            {},
            "domain example.org aliases 'a'",
        ),
        ([DomainConfig(name="example.org", catch_all="a@")], {}, "domain example.org catch_all"),
        ([], {"a": ("@x",)}, "global alias 'a'"),
    ],
)
def test_malformed_targets_fail_at_start(
    domains: list[DomainConfig], aliases: dict[str, tuple[str, ...]], message: str
) -> None:
    with pytest.raises(AliasesError, match=message):
        LocalRecipients(domains, aliases, hostname="h")


@given(st.text(min_size=1, max_size=64))
def test_resolve_never_raises(text: str) -> None:
    local = LocalRecipients(DOMAINS, GLOBAL_ALIASES, hostname="mx.example.org")
    escaped = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for address in (
        Address(escaped, "example.org"),
        Address(text, "example.net"),
        Address(text, ""),
    ):
        result = local.resolve(address)
        assert isinstance(result, RecipientAccepted | RecipientRejected)
        if isinstance(result, RecipientAccepted):
            for target in result.targets:
                assert local.mailbox_exists(target) or not local.is_local_domain(
                    target.rpartition("@")[2]
                )


# -- names the config refers to that resolve to nothing (check-config, start, reload) --


def _problems(domains: list[DomainConfig], global_map: dict[str, tuple[str, ...]]) -> list[str]:
    local = LocalRecipients(domains, global_map, hostname="mx.example.org")
    return local.unresolved_references(domains, global_map)


def test_a_clean_config_has_no_unresolved_references() -> None:
    domains = [
        DomainConfig(name="example.org", mailboxes=("alice", "bob"), aliases={"team": ("alice",)}),
        DomainConfig(name="catchall.test", mailboxes=("info",), catch_all="info"),
        DomainConfig(name="other.test", catch_all="alice@example.org"),
        DomainConfig(name="remote.test", catch_all="x@elsewhere.example"),
        DomainConfig(name="via-alias.test", catch_all="all", aliases={"all": ("bob@example.org",)}),
        DomainConfig(
            name="self.test",
            mailboxes=("carol",),
            aliases={"carol": ("carol", "x@elsewhere.example"), "d": ("\\carol",)},
        ),
        DomainConfig(
            name="ca.test", catch_all="info", aliases={"x": ("nobody",), "info": ("y@z.example",)}
        ),
    ]
    assert _problems(domains, {"root": ("alice",), "hostmaster": ("postmaster",)}) == []


def test_every_dangling_reference_is_reported_by_key() -> None:
    domains = [
        DomainConfig(name="example.org", mailboxes=("alice",)),
        DomainConfig(
            name="example.net",
            mailboxes=("erin",),
            aliases={
                "sales": ("erin", "ghost"),
                "cross": ("nobody@example.org",),
                "direct": ("\\nomailbox",),
                "selfish": ("selfish",),
                "ping": ("pong",),
                "pong": ("ping",),
            },
        ),
        DomainConfig(name="catchall.test", mailboxes=("info",), catch_all="catchall"),
    ]
    assert _problems(domains, {"root": ("admin",), "abuse": ("nobody@example.org",)}) == [
        'domain[1].aliases.sales: "ghost" is not a mailbox or alias of example.net',
        'domain[1].aliases.cross: "nobody@example.org" is not a mailbox or alias of example.org',
        'domain[1].aliases.direct: "\\nomailbox" is not a mailbox or alias of example.net',
        'domain[1].aliases.selfish: "selfish": alias selfish@example.net names itself and is '
        "no mailbox",
        'domain[1].aliases.ping: "pong": alias loop: ping@example.net -> pong@example.net '
        "-> ping@example.net",
        'domain[1].aliases.pong: "ping": alias loop: pong@example.net -> ping@example.net '
        "-> pong@example.net",
        'domain[2].catch_all: "catchall" is not a mailbox or alias of catchall.test',
        'aliases.map.root: "admin" is not a mailbox or alias in any local domain',
        'aliases.map.abuse: "nobody@example.org" is not a mailbox or alias of example.org',
    ]
