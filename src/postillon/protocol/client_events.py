"""Events returned by ``ClientConnection.next_event()``, and the EHLO extension list.

All client events are information: the core has already done what follows from
the reply (sent HELO after a refused EHLO, the next RCPT without PIPELINING,
RSET after a transaction that failed once MAIL was accepted). The adapter acts
on a few of them:

* :class:`Greeting` - 220: call ``hello()``; anything else: the server refused
  the session (QUIT is still allowed unless ``closing``).
* :class:`HelloAccepted` / :class:`HelloRejected`.
* :class:`StartTlsReply` - 220: flush, do the TLS handshake, call
  ``tls_established()``, then ``hello()`` again (RFC 3207 §4.2).
* :class:`BodyRequested` - stream the message with ``send_body()``.
* :class:`TransactionDone` - the final reply for every recipient.

After a 421 (RFC 5321 §3.8), EOF or a malformed reply the connection is
``closing``: the event of the command being answered comes first (a 421 to RCPT
ends the transaction with :class:`TransactionDone`, every unanswered recipient
getting that 421), then nothing more but ``NEED_DATA``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from postillon.core.reply import Reply

__all__ = [
    "AuthReply",
    "BodyRequested",
    "ChunkReply",
    "ClientEvent",
    "CommandReply",
    "ConnectionClosed",
    "Extensions",
    "Greeting",
    "HelloAccepted",
    "HelloRejected",
    "MailReply",
    "ProtocolViolation",
    "RcptReply",
    "ServiceClosing",
    "StartTlsReply",
    "TransactionDone",
]


class Extensions(Mapping[str, str]):
    """The EHLO/LHLO keywords (upper-cased) with their parameters as one string.

    ``ext["SIZE"] == "10240000"``, ``ext["PIPELINING"] == ""``. A HELO session
    has none. Built by ``parse_ehlo`` from the reply lines after the first.
    """

    __slots__ = ("_auth", "_keywords")

    def __init__(self, keywords: Mapping[str, str] | None = None) -> None:
        self._keywords = dict(keywords or {})
        mechs: set[str] = set()
        for key in ("AUTH", "AUTH="):  # "AUTH=LOGIN PLAIN": pre-RFC 4954 servers
            mechs.update(self._keywords.get(key, "").upper().split())
        self._auth = frozenset(mechs)

    @classmethod
    def parse_ehlo(cls, lines: tuple[str, ...]) -> Extensions:
        """Keywords from the lines of a 250 EHLO reply (the first line is the greeting)."""
        keywords: dict[str, str] = {}
        for line in lines[1:]:
            word, _, params = line.strip().partition(" ")
            if word[:5].upper() == "AUTH=":  # legacy "AUTH=PLAIN LOGIN"
                word, params = "AUTH=", f"{word[5:]} {params}".strip()
            key = word.upper()
            if not key or not (key == "AUTH=" or key.replace("-", "").isalnum()):
                continue  # not an ehlo-keyword (RFC 5321 §4.1.1.1): ignored
            if key not in keywords:
                keywords[key] = " ".join(params.split())
        return cls(keywords)

    def __getitem__(self, key: str) -> str:
        return self._keywords[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._keywords

    def __iter__(self) -> Iterator[str]:
        return iter(self._keywords)

    def __len__(self) -> int:
        return len(self._keywords)

    def __repr__(self) -> str:
        return f"Extensions({self._keywords!r})"

    @property
    def size(self) -> int | None:
        """RFC 1870: None when SIZE is not offered, 0 when offered without a limit."""
        value = self._keywords.get("SIZE")
        if value is None:
            return None
        head = value.split(" ", 1)[0]
        return int(head) if head.isdigit() else 0

    @property
    def limits(self) -> dict[str, int]:
        """RFC 9422 ``LIMITS name=value ...``: each well-formed limit (upper-cased
        name, positive integer value); unknown names kept, malformed ones ignored."""
        out: dict[str, int] = {}
        for pair in self._keywords.get("LIMITS", "").split():
            name, sep, value = pair.partition("=")
            if sep and name.replace("-", "").isalnum() and value.isdigit() and int(value) > 0:
                out.setdefault(name.upper(), int(value))
        return out

    @property
    def rcpt_max(self) -> int | None:
        """RFC 9422 RCPTMAX: recipients per transaction (None: not announced)."""
        return self.limits.get("RCPTMAX")

    @property
    def mail_max(self) -> int | None:
        """RFC 9422 MAILMAX: transactions per session (None: not announced)."""
        return self.limits.get("MAILMAX")

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """RFC 4954 SASL mechanisms, upper-cased (also from the legacy ``AUTH=`` line)."""
        return self._auth


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """Base class of everything ``ClientConnection.next_event()`` returns (except NEED_DATA)."""


@dataclass(frozen=True, slots=True)
class Greeting(ClientEvent):
    """The server's greeting: 220, or a refusal (554; 421 also sets ``closing``)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class HelloAccepted(ClientEvent):
    """EHLO, HELO (the fallback after a 5xx to EHLO) or LHLO was accepted."""

    verb: str
    reply: Reply
    extensions: Extensions


@dataclass(frozen=True, slots=True)
class HelloRejected(ClientEvent):
    """The hello failed: 4xx to EHLO, 5xx to EHLO and then to HELO, or LHLO refused."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTlsReply(ClientEvent):
    """The answer to STARTTLS; ``ready`` (220) means: handshake now."""

    reply: Reply

    @property
    def ready(self) -> bool:
        return self.reply.code == 220


@dataclass(frozen=True, slots=True)
class AuthReply(ClientEvent):
    """The final answer to AUTH (235 success; 334 challenges are handled by the core)."""

    reply: Reply

    @property
    def ok(self) -> bool:
        return 200 <= self.reply.code < 300


@dataclass(frozen=True, slots=True)
class MailReply(ClientEvent):
    """The answer to MAIL FROM (information; the transaction goes on by itself)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class RcptReply(ClientEvent):
    """The answer to the RCPT TO of recipient ``index`` (input order)."""

    index: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class BodyRequested(ClientEvent):
    """Send the message now with ``send_body()``.

    ``reply`` is the 354 for DATA, None for BDAT (sent once a recipient is accepted).
    """

    reply: Reply | None


@dataclass(frozen=True, slots=True)
class ChunkReply(ClientEvent):
    """The answer to a non-LAST BDAT chunk (RFC 3030 §2); an error ends the body."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionDone(ClientEvent):
    """The transaction is over; one final reply per recipient, in input order.

    A recipient's reply is its RCPT rejection, else the reply to the message
    (DATA/BDAT end, or its own reply in LMTP), else the failure that ended the
    transaction first (MAIL refused, DATA refused, a BDAT chunk refused, a 421).
    ``mail_reply`` is None when nothing was sent (SMTPUTF8 or SIZE refusal by
    the client itself). ``interrupted`` is empty, or why the connection broke
    before all replies arrived (EOF, malformed reply): recipients still without
    an answer then carry a 451 made up by the client (4.4.2 or 4.5.0), and a
    :class:`ConnectionClosed` or :class:`ProtocolViolation` follows.
    """

    mail_reply: Reply | None
    per_recipient: tuple[Reply, ...]
    interrupted: str = ""


@dataclass(frozen=True, slots=True)
class CommandReply(ClientEvent):
    """The answer to RSET, NOOP or QUIT (``verb``)."""

    verb: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class ServiceClosing(ClientEvent):
    """A 421 that answered none of the adapter's commands (unsolicited, or to an
    internal RSET): ``closing`` is set."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class ConnectionClosed(ClientEvent):
    """The server closed its side (EOF); ``detail`` says what was still expected."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProtocolViolation(ClientEvent):
    """The server sent something that is not an SMTP reply, or a reply out of turn.

    The connection cannot be trusted any more: ``closing`` is set.
    """

    detail: str
