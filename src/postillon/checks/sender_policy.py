"""Sender policy for authenticated submission: a user sends only as itself.

An authenticated user may put in MAIL FROM and in ``From:`` only the
addresses of its account (``Account.addresses``); it may relay to any domain
(that is ``RelayPolicy``'s business, not this file's). The mode comes from
``[submission] sender_policy``:

- ``off``: no check;
- ``warn``: accept, and return a warning for the mail log;
- ``enforce``: refuse: ``553 5.7.1`` at MAIL FROM, ``550 5.7.1`` at end of data
  for ``From:``.

Matching rules (pure functions, no I/O):

- the domain is compared case-insensitively, in A-label form (IDNA), and
  without a trailing dot;
- the local part is compared case-insensitively too. RFC 5321 §2.4 lets a
  server treat local parts as case-sensitive, but these are the user's own
  mailboxes on a system that does not, and "Alice@" spoofing "alice@" is not
  a thing; quoting is removed before comparing (``"alice"@x`` is ``alice@x``);
- an account entry ``*@example.com`` allows every local part of that domain;
- with a recipient delimiter (e.g. ``+``), ``alice+tag@x`` counts as ``alice@x``;
- the null sender ``MAIL FROM:<>`` is allowed: it claims no identity (the
  ``From:`` check still applies);
- every address in every ``From:`` header must be owned; a ``From:`` that
  yields no address at all is treated as not owned; a message with no
  ``From:`` is left to other checks (RFC 5322 requires one, but this check
  is about ownership).
"""

from __future__ import annotations

import email.policy
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Literal

from postillon.core.account import Account
from postillon.core.address import AddressError, domain_to_ascii, unquote_local_part
from postillon.core.reply import Reply

SenderMode = Literal["off", "warn", "enforce"]

MAIL_FROM_NOT_OWNED = Reply.of(553, "5.7.1", "Sender address not owned by user")
FROM_HEADER_NOT_OWNED = Reply.of(550, "5.7.1", "From: header address not owned by user")


@dataclass(frozen=True, slots=True)
class SenderDecision:
    """``allowed`` False only in enforce mode (then ``reply`` is set); ``warning``
    is set whenever an address is not owned (also in enforce mode), for the log."""

    allowed: bool
    warning: str | None = None
    reply: Reply | None = None


ALLOWED = SenderDecision(True)


def _split(address: str, delimiter: str) -> tuple[str, str] | None:
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        return None
    local = unquote_local_part(local).lower()
    if delimiter and local != "*":
        local = local.split(delimiter, 1)[0]
    try:
        domain = domain_to_ascii(domain.rstrip("."))
    except AddressError:
        domain = domain.lower().rstrip(".")
    return local, domain


def address_owned(account: Account, address: str, recipient_delimiter: str = "") -> bool:
    """Whether ``account`` may use ``address`` (rules in the module docstring)."""
    wanted = _split(address, recipient_delimiter)
    if wanted is None:
        return False
    for entry in account.addresses:
        own = _split(entry, "")
        if own is None:
            continue
        if own[1] == wanted[1] and own[0] in ("*", wanted[0]):
            return True
    return False


def check_mail_from(
    account: Account, mail_from: str, mode: SenderMode, recipient_delimiter: str = ""
) -> SenderDecision:
    """At MAIL FROM. ``mail_from`` is the reverse path without brackets ("" for <>)."""
    if mode == "off" or mail_from in ("", "<>"):
        return ALLOWED
    if address_owned(account, mail_from, recipient_delimiter):
        return ALLOWED
    warning = f"MAIL FROM <{mail_from}> not owned by user {account.username}"
    if mode == "warn":
        return SenderDecision(True, warning)
    return SenderDecision(False, warning, MAIL_FROM_NOT_OWNED)


def from_header_addresses(values: Iterable[str]) -> list[str]:
    """The addr-specs in the given ``From:`` header values (empty ones dropped)."""
    return [addr for _name, addr in getaddresses(list(values)) if addr]


def from_header_values(header_block: bytes) -> list[str]:
    """The values of every ``From:`` header in a header section (e.g. intake's
    ``header_block()``), unfolded and RFC 2047-decoded; the body is not parsed."""
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(header_block)
    return [str(v) for v in parsed.get_all("From") or ()]


def check_from_header(
    account: Account, values: Iterable[str], mode: SenderMode, recipient_delimiter: str = ""
) -> SenderDecision:
    """At end of data. ``values`` are the (unfolded) bodies of every ``From:`` header."""
    values = [v for v in values if v.strip()]
    if mode == "off" or not values:
        return ALLOWED
    addresses = from_header_addresses(values)
    bad = [a for a in addresses if not address_owned(account, a, recipient_delimiter)]
    if addresses and not bad:
        return ALLOWED
    shown = ", ".join(f"<{a}>" for a in bad) if bad else repr("; ".join(values)[:200])
    warning = f"From: {shown} not owned by user {account.username}"
    if mode == "warn":
        return SenderDecision(True, warning)
    return SenderDecision(False, warning, FROM_HEADER_NOT_OWNED)
