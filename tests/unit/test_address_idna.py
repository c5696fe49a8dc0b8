"""Domains to A-labels: IDNA 2008 with the UTS #46 mapping (non-transitional), never the
standard library's IDNA 2003 codec. Under IDNA 2003, ``faß.de`` became ``fass.de``: mail
for one domain routed by the MX records of another. Each case names what 2003 got wrong."""

from __future__ import annotations

import pytest

from postillon.core.address import (
    Address,
    AddressError,
    domain_to_ascii,
    parse_domain,
    parse_mailbox,
)

CASES = [
    # (why, domain, A-label form)
    ("sharp s is kept (2003: fass.de)", "faß.de", "xn--fa-hia.de"),
    ("sharp s alone (2003: ss.de)", "ß.de", "xn--zca.de"),
    ("final sigma is kept (2003: xn--nxasmq6b.com)", "βόλος.com", "xn--nxasmm1c.com"),
    ("ZWJ after a virama is kept (2003: dropped)", "ශ්\u200dරී.com", "xn--10cl1a0b660p.com"),
    (
        "ZWNJ in Persian is kept (2003: dropped)",
        "\u0646\u0627\u0645\u0647\u200c\u0627\u06cc.com",
        "xn--mgba3gch31f060k.com",
    ),
    ("UTS 46 maps case and width", "\uff22\u00dccher.Example", "xn--bcher-kva.example"),
    ("a U-label", "bücher.example", "xn--bcher-kva.example"),
    ("a trailing dot stays", "faß.de.", "xn--fa-hia.de."),
    ("ASCII is only lower-cased", "Example.ORG", "example.org"),
    ("an A-label passes through", "XN--FA-HIA.de", "xn--fa-hia.de"),
    ("an address literal is not a name", "[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
]


@pytest.mark.parametrize(("domain", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_domain_to_ascii(domain: str, expected: str) -> None:
    assert domain_to_ascii(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "☃.net",  # a symbol: DISALLOWED in IDNA 2008 (2003 made it xn--n3h.net)
        "a\u200db.de",  # a joiner with no virama before it: CONTEXTJ fails (2003: ab.de)
        "x.\u0300a.de",  # a label that starts with a combining mark
    ],
)
def test_domains_idna_2008_refuses(domain: str) -> None:
    with pytest.raises(AddressError):
        domain_to_ascii(domain)
    with pytest.raises(AddressError):
        parse_domain(domain, smtputf8=True)


def test_an_address_keeps_its_u_label_and_gives_its_a_label() -> None:
    address = parse_mailbox("user@Faß.DE", smtputf8=True)
    assert address == Address("user", "faß.de")
    assert address.domain_ascii == "xn--fa-hia.de"
    assert address.needs_smtputf8


def test_non_ascii_domain_needs_smtputf8() -> None:
    with pytest.raises(AddressError):
        parse_mailbox("user@faß.de")
