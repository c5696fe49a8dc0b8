"""What a check sees: the connection, the transaction, one recipient, the message.

The session fills these; checks read them. Checks change them only through the
``Decision`` they return (``decision.py``), with two documented exceptions, both
facts about the client found at connect: the reverse-DNS check sets
``client.rdns``/``client.rdns_status`` and any check may leave a note for later
ones in ``SessionContext.notes`` (e.g. ``"dnswl"`` for greylisting to skip).
Per-session state of a check (a milter connection, a greylist answer) goes in
``SessionContext.state[check.name]``; the pipeline calls ``Check.close`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from postillon.core.address import Address
from postillon.core.envelope import MailParams, RcptParams

ListenerKind = Literal["smtp", "submission", "submissions", "lmtp"]
# How the client's reverse DNS came out (forward-confirmed or not; RFC 8601 "iprev"):
# ok = PTR name whose A/AAAA includes the IP; unknown = no PTR, or it does not confirm;
# tempfail = the lookup failed for now; "" = not looked up (not an MX listener).
RdnsStatus = Literal["", "ok", "unknown", "tempfail"]


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """The connection as far as known; replaced (``dataclasses.replace``) as it grows."""

    ip: str
    port: int = 0
    listener: str = ""  # the listener's label
    kind: ListenerKind = "smtp"
    hostname: str = ""  # our own name (HELO checks compare with it)
    local_ips: tuple[str, ...] = ()  # our listening addresses (a stranger claiming them)
    rdns: str = ""  # forward-confirmed reverse name, "" when none
    rdns_status: RdnsStatus = ""
    helo: str = ""
    esmtp: bool = True
    tls_version: str = ""  # "TLSv1.3"; "" in plaintext
    tls_cipher: str = ""
    authenticated: bool = False
    username: str = ""  # the SMTP AUTH identity once authenticated
    trusted: bool = False  # in [relay] trusted_networks
    pregreet: bytes = b""  # what the client sent before our greeting (first bytes)
    hide_ip: bool = False  # submission keeps the client's IP out of headers and the log

    def describe(self) -> str:
        """``helo (rdns [ip])``, as intake's ``ClientInfo.describe`` (the log's form)."""
        if self.hide_ip:
            return self.helo or "unknown"
        inner = f"{self.rdns or 'unknown'} [{self.ip}]" if self.ip else "local"
        return f"{self.helo or 'unknown'} ({inner})"


@dataclass(slots=True)
class SessionContext:
    """One SMTP session, for the pipeline and its checks."""

    session_id: str
    client: ClientFacts
    notes: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    address: str  # as the client gave it (RFC 5321 path, no brackets)
    params: RcptParams | None = None
    path: Address | None = None  # the parsed path, when the session has it
    targets: tuple[str, ...] = ()  # final addresses, once the relay check routed it


@dataclass(slots=True)
class TransactionContext:
    """One MAIL ... end of data. ``queue_id`` is known from MAIL on (intake makes it)."""

    sender: str  # "" for the null reverse-path
    params: MailParams | None = None
    queue_id: str = ""
    recipients: list[RecipientFacts] = field(default_factory=list)
    # Set by a discard at an earlier phase: the message is dropped at end of data.
    discarded: str = ""
    quarantined: str = ""  # the first quarantine reason, "" when none
    checks_done: set[str] = field(default_factory=set)  # checks that answered "accept"


class MessageView(Protocol):
    """The message at end of data, complete, not yet committed. ``header`` is the
    client's header section as changed by the checks so far (CRLF lines, no empty
    line); ``prepend`` the fields added on top so far."""

    @property
    def header(self) -> bytes: ...

    @property
    def prepend(self) -> bytes: ...

    @property
    def size(self) -> int: ...

    def message_bytes(self) -> bytes:
        """The whole message as received (header + body, without our Received:);
        in memory: ask only under a size bound."""
        ...

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body (after the header section's empty line), in chunks, from the spool."""
        ...
