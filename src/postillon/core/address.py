"""Mail addresses and SMTP paths (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8).

``parse_path`` is the single place where a client's ``<...>`` becomes an
``Address``. It is strict about syntax because every relay trick (percent hack,
bang paths, quoted local parts containing ``@``, double ``@``) starts as an
address that a lenient parser would "helpfully" reinterpret. postillon never
reinterprets: the domain is what follows the last unquoted ``@`` of a valid
Mailbox, and the local part is opaque.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 §4.5.3.1.1-3 size limits.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+")
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
# RFC 6531 §3.3: atext gains UTF8-non-ascii when SMTPUTF8 is in use.
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_UTF8_LABEL = re.compile(
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)


class AddressError(ValueError):
    """A path or mailbox that does not follow RFC 5321 syntax."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox ``local_part@domain``.

    ``local_part`` is kept exactly as received except that a quoted string is
    kept in its quoted form (so ``str()`` round-trips). ``domain`` is lower-cased;
    for an address literal it is the bracketed literal.
    """

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_quoted(self) -> bool:
        return self.local_part.startswith('"')

    @property
    def needs_smtputf8(self) -> bool:
        return not str(self).isascii()

    @property
    def domain_ascii(self) -> str:
        """The domain in A-label form, for DNS and for peers without SMTPUTF8."""
        return domain_to_ascii(self.domain)

    def with_domain(self, domain: str) -> Address:
        return Address(self.local_part, domain.lower())


# The null reverse path "<>" (RFC 5321 §4.5.5): bounces and other notifications.
NULL_PATH: Address | None = None


def domain_to_ascii(domain: str) -> str:
    """The domain in A-label form: the one place a domain becomes what DNS and peers
    without SMTPUTF8 see. IDNA 2008 with the UTS #46 mapping (case and width folded,
    non-transitional), never the standard library's ``idna`` codec: that is IDNA 2003,
    which turns ``faß.de`` into ``fass.de``, someone else's domain. ASCII names and
    address literals are only lower-cased."""
    if domain.isascii() or domain.startswith("["):
        return domain.lower()
    # Imported on first use: most processes (sendmail, the CLI) never meet an IDN. The
    # server imports it while still root (app.py), as it does punycode.
    import idna

    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except UnicodeError as exc:  # idna.IDNAError is one
        raise AddressError(f"domain {domain!r} is not a valid IDN") from exc


def ascii_address(address: str) -> str | None:
    """``address`` as a peer without SMTPUTF8 can take it: a U-label domain
    becomes its A-label (IDNA 2008); None when that is not enough, because the
    local part is not ASCII (RFC 6531 §3.2: no downgrade of a local part) or the
    domain is no valid IDN."""
    if address.isascii():
        return address
    local, sep, domain = address.rpartition("@")  # a domain never holds "@"
    if not sep or not local.isascii():
        return None
    try:
        return f"{local}@{domain_to_ascii(domain)}"
    except AddressError:
        return None


def parse_domain(text: str, *, smtputf8: bool = False) -> str:
    """Validate a Domain or address-literal; return it lower-cased."""
    if not text or len(text) > MAX_DOMAIN:
        raise AddressError("domain missing or too long")
    if text.startswith("["):
        _check_address_literal(text)
        return text.lower()
    labels = text.split(".")
    label_re = _UTF8_LABEL if smtputf8 else _LDH_LABEL
    for label in labels:
        if not label or len(label) > 63 or not label_re.match(label):
            raise AddressError(f"invalid domain {text!r}")
    if not text.isascii():
        domain_to_ascii(text)  # raises for labels IDNA cannot encode
    return text.lower()


def _check_address_literal(text: str) -> None:
    if not text.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError as exc:
        raise AddressError(f"invalid address literal {text!r}") from exc


def closing_quote(text: str, start: int) -> int:
    """Index of the quote closing the quoted string opened at ``start``, or -1
    (a backslash escapes the next character, RFC 5321 quoted-pairSMTP)."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        i += 1
    return -1


def _split_mailbox(text: str) -> tuple[str, str]:
    """Split at the ``@`` that ends the local part, honouring a quoted local part."""
    if text.startswith('"'):
        i = closing_quote(text, 0)
        if i < 0:
            raise AddressError("unterminated quoted local part")
        local, rest = text[: i + 1], text[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("quoted local part must be followed by @domain")
        return local, rest[1:]
    local, sep, domain = text.partition("@")
    if not sep:
        raise AddressError("address has no domain")
    return local, domain


def _check_quoted(local: str, smtputf8: bool) -> None:
    i = 1
    end = len(local) - 1
    while i < end:
        c = local[i]
        o = ord(c)
        if c == "\\":
            if i + 1 >= end or not (32 <= ord(local[i + 1]) <= 126):
                raise AddressError("invalid quoted-pair in local part")
            i += 2
            continue
        if o in (34, 92) or o < 32 or o == 127 or (o > 127 and not smtputf8):
            raise AddressError("invalid character in quoted local part")
        i += 1


def parse_mailbox(text: str, *, smtputf8: bool = False) -> Address:
    """Parse ``local@domain`` (no angle brackets)."""
    local, domain = _split_mailbox(text)
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part missing or longer than 64 octets")
    if local.startswith('"'):
        _check_quoted(local, smtputf8)
    else:
        pattern = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING_ASCII
        if not pattern.match(local):
            raise AddressError(f"invalid local part {local!r}")
    return Address(local, parse_domain(domain, smtputf8=smtputf8))


def parse_path(
    text: str, *, allow_null: bool = False, allow_postmaster: bool = False, smtputf8: bool = False
) -> Address | None:
    """Parse a ``<path>`` as given after ``MAIL FROM:`` or ``RCPT TO:``.

    Returns ``None`` for the null path ``<>`` (only when ``allow_null``). A source
    route (``<@a,@b:user@c>``) is accepted and ignored (RFC 5321 §4.1.2, C.).
    ``<Postmaster>`` without a domain gives ``Address("Postmaster", "")`` when
    ``allow_postmaster`` (RFC 5321 §4.5.1, RCPT only).
    """
    if len(text.encode("utf-8")) > MAX_PATH + 2:
        raise AddressError("path longer than 256 octets")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        route, colon, rest = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("invalid source route")
            parse_domain(hop[1:], smtputf8=smtputf8)
        inner = rest
    if allow_postmaster and inner.lower() == "postmaster":
        return Address("Postmaster", "")
    if not smtputf8 and not inner.isascii():
        raise AddressError("non-ASCII address requires SMTPUTF8")
    return parse_mailbox(inner, smtputf8=smtputf8)


def unquote_local_part(local: str) -> str:
    """The local part's content, with quoting removed (for mailbox lookups)."""
    if not local.startswith('"'):
        return local
    out = []
    i = 1
    while i < len(local) - 1:
        if local[i] == "\\":
            out.append(local[i + 1])
            i += 2
        else:
            out.append(local[i])
            i += 1
    return "".join(out)
