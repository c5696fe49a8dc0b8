"""SMTP transcripts: one dialogue per text file, played against a server.

chasquid's ``test/t-12-minor_dialogs/*.cmy`` habit. Parsing a file
(:func:`parse_transcript`) is separate from playing it (:func:`play`), which
talks to any :class:`Peer`: :class:`MemoryPeer` here drives a
``ServerConnection`` in memory with a :class:`ScriptedAdapter`; a socket peer
for the live listener only needs the same five methods.

File format (UTF-8, one directive per line)::

    # First line: a comment saying why this transcript exists (required).
    # Further "#" lines and blank lines are ignored.
    O: max_message_size=100 lmtp=true   ServerSettings fields (before any other step)
    S: 250 2.1.0                        the next server line starts with this text
    C: MAIL FROM:<a@b.test>             client sends the text; CRLF is appended
    R: DATA\\r\\nbody\\n.\\n                client sends raw bytes; nothing appended
    E: MailFrom                         that event happened (after the previous E:)
    CLOSE                               the client closes its side (EOF)
    CLOSED                              the server has closed the connection

``C:`` and ``R:`` payloads take escapes: ``\\r \\n \\t \\\\ \\xHH`` and
``\\{N:TEXT}`` (TEXT repeated N times; TEXT may not contain ``}``). ``S:``
and ``E:`` payloads are literal. ``E:`` lines are checked only by peers that
see events (the in-memory one); a live peer skips them. After the last step
no unexpected server output may remain.

The scripted adapter (the policy every transcript assumes):

* hello: accepted (``accept_hello()``);
* MAIL: ``550 5.7.1`` when the sender's domain is ``reject.test``, else ``250 2.1.0``;
* RCPT: ``550 5.1.1`` for domain ``reject.test``, else ``250 2.1.5``;
* DATA / first BDAT: ``554 5.7.1`` when an accepted recipient is at
  ``nodata.test``, else ``354``;
* end of message: ``250 2.0.0 Ok: queued``; in LMTP one reply per accepted
  recipient: ``452 4.2.2 Mailbox full`` for local part ``full``, else
  ``250 2.0.0 Ok: delivered``;
* STARTTLS: ``220 2.0.0 Ready to start TLS``; the simulated handshake
  (``tls_established()``) happens after the client's current ``C:``/``R:``
  payload has been fed, so bytes pipelined after STARTTLS in the same payload
  arrive "before TLS" and must be discarded.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postillon.core.address import Address
from postillon.core.reply import Reply
from postillon.protocol.events import (
    NEED_DATA,
    DataRequested,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageComplete,
    RcptTo,
    StartTlsRequested,
    TransactionReset,
)
from postillon.protocol.server import ServerConnection, ServerSettings, State

DEFAULT_HOSTNAME = "mx.test"
_REPLY_LINE = re.compile(r"[2-5][0-9][0-9]([ -]|\Z)")

# --- the file format ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    lineno: int


@dataclass(frozen=True, slots=True)
class Expect:
    prefix: str
    lineno: int


@dataclass(frozen=True, slots=True)
class ExpectEvent:
    name: str
    lineno: int


@dataclass(frozen=True, slots=True)
class ClientClose:
    lineno: int


@dataclass(frozen=True, slots=True)
class ExpectClosed:
    lineno: int


Step = Send | Expect | ExpectEvent | ClientClose | ExpectClosed


@dataclass(frozen=True, slots=True)
class Transcript:
    name: str
    purpose: str  # the first line's comment
    options: dict[str, str]
    steps: tuple[Step, ...]


class TranscriptError(AssertionError):
    """A transcript that cannot be parsed, or a dialogue that did not go as written."""


_ESCAPE = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|\{(\d+):([^}]*)\}|(.))", re.DOTALL)
_SIMPLE = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}


def decode_escapes(text: str) -> bytes:
    """``C:``/``R:`` payload to bytes (see the module docstring)."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        hexpair, count, repeated, simple = m.groups()
        if hexpair is not None:
            out.append(int(hexpair, 16))
        elif count is not None:
            out += repeated.encode("utf-8") * int(count)
        elif simple in _SIMPLE:
            out += _SIMPLE[simple]
        else:
            raise ValueError(f"unknown escape \\{simple}")
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def parse_transcript(text: str, name: str = "<transcript>") -> Transcript:
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#"):
        raise TranscriptError(f"{name}: the first line must be a '#' comment saying why")
    purpose = lines[0].lstrip("#").strip()
    options: dict[str, str] = {}
    steps: list[Step] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line == "CLOSE":
            steps.append(ClientClose(lineno))
            continue
        if line == "CLOSED":
            steps.append(ExpectClosed(lineno))
            continue
        tag, colon, payload = line.partition(":")
        if not colon or tag not in ("O", "S", "C", "R", "E"):
            raise TranscriptError(f"{name}:{lineno}: unknown directive {line!r}")
        payload = payload.removeprefix(" ")
        try:
            if tag == "O":
                if steps:
                    raise ValueError("options must come before the dialogue")
                for item in payload.split():
                    key, eq, value = item.partition("=")
                    if not eq:
                        raise ValueError(f"option {item!r} is not key=value")
                    options[key] = value
            elif tag == "S":
                steps.append(Expect(payload, lineno))
            elif tag == "E":
                steps.append(ExpectEvent(payload.strip(), lineno))
            elif tag == "C":
                steps.append(Send(decode_escapes(payload) + b"\r\n", lineno))
            else:
                steps.append(Send(decode_escapes(payload), lineno))
        except ValueError as exc:
            raise TranscriptError(f"{name}:{lineno}: {exc}") from None
    return Transcript(name, purpose, options, tuple(steps))


def load_transcript(path: str | Path) -> Transcript:
    path = Path(path)
    return parse_transcript(path.read_text(encoding="utf-8"), path.name)


def settings_from_options(
    options: dict[str, str], hostname: str = DEFAULT_HOSTNAME
) -> ServerSettings:
    """Transcript options to ServerSettings (ints, booleans, comma-separated tuples)."""
    defaults = ServerSettings(hostname)
    values: dict[str, object] = {}
    known = {f.name for f in dataclasses.fields(ServerSettings)}
    for key, raw in options.items():
        if key not in known:
            raise TranscriptError(f"unknown option {key!r}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            if raw not in ("true", "false"):
                raise TranscriptError(f"option {key} must be true or false")
            values[key] = raw == "true"
        elif isinstance(default, int):
            values[key] = int(raw)
        elif isinstance(default, tuple):
            values[key] = tuple(x for x in raw.split(",") if x)
        else:
            values[key] = raw
    return dataclasses.replace(defaults, **values)  # type: ignore[arg-type]


# --- playing a transcript -----------------------------------------------------------


class Peer(Protocol):
    """The server side as a transcript sees it."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def read_line(self) -> str | None:
        """The next server line without CRLF, or None when the server said nothing more."""
        ...

    def server_closed(self) -> bool: ...

    def event_names(self) -> list[str] | None:
        """Names of the events so far, or None when this peer cannot see them."""
        ...


def play(transcript: Transcript, peer: Peer) -> None:
    """Play ``transcript`` against ``peer``; raise TranscriptError at the first difference."""
    log: list[str] = []
    event_index = 0

    def fail(step: Step, message: str) -> TranscriptError:
        recent = "\n".join(log[-15:])
        return TranscriptError(
            f"{transcript.name}:{step.lineno}: {message}\n--- dialogue so far ---\n{recent}"
        )

    for step in transcript.steps:
        if isinstance(step, Send):
            log.append(f"C: {step.data!r}")
            peer.send(step.data)
        elif isinstance(step, ClientClose):
            log.append("C: <close>")
            peer.close()
        elif isinstance(step, Expect):
            line = peer.read_line()
            if line is None:
                raise fail(step, f"expected {step.prefix!r}, the server sent nothing")
            log.append(f"S: {line}")
            if not line.startswith(step.prefix):
                raise fail(step, f"expected {step.prefix!r}, got {line!r}")
        elif isinstance(step, ExpectEvent):
            names = peer.event_names()
            if names is None:
                continue
            try:
                event_index = names.index(step.name, event_index) + 1
            except ValueError:
                raise fail(step, f"no {step.name} event after #{event_index}: {names}") from None
        elif isinstance(step, ExpectClosed) and not peer.server_closed():
            raise fail(step, "the server has not closed the connection")
    extra = peer.read_line()
    if extra is not None:
        last = transcript.steps[-1] if transcript.steps else ClientClose(0)
        raise fail(last, f"unexpected server output at the end: {extra!r}")


# --- the in-memory peer ---------------------------------------------------------------


class ScriptedAdapter:
    """The policy transcripts assume (see the module docstring)."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.recipients: list[Address] = []
        self.tls_handshake_due = False

    def handle(self, event: Event) -> None:
        conn = self.conn
        if isinstance(event, Hello):
            conn.accept_hello()
        elif isinstance(event, MailFrom):
            self.recipients = []
            if event.sender is not None and event.sender.domain == "reject.test":
                conn.reply(Reply.of(550, "5.7.1", "Sender rejected"))
            else:
                conn.reply(Reply.of(250, "2.1.0", "Ok"))
        elif isinstance(event, RcptTo):
            if event.recipient.domain == "reject.test":
                conn.reply(Reply.of(550, "5.1.1", "Recipient rejected"))
            else:
                self.recipients.append(event.recipient)
                conn.reply(Reply.of(250, "2.1.5", "Ok"))
        elif isinstance(event, DataRequested):
            if any(r.domain == "nodata.test" for r in self.recipients):
                conn.reply(Reply.of(554, "5.7.1", "Data refused"))
            else:
                conn.reply(Reply.of(354, None, "End data with <CR><LF>.<CR><LF>"))
        elif isinstance(event, StartTlsRequested):
            conn.reply(Reply.of(220, "2.0.0", "Ready to start TLS"))
            self.tls_handshake_due = True
        elif isinstance(event, MessageComplete):
            if event.recipients is None:
                conn.reply(Reply.of(250, "2.0.0", "Ok: queued"))
            else:
                for rcpt in self.recipients[: event.recipients]:
                    if rcpt.local_part == "full":
                        conn.reply(Reply.of(452, "4.2.2", "Mailbox full"))
                    else:
                        conn.reply(Reply.of(250, "2.0.0", "Ok: delivered"))
            self.recipients = []
        elif isinstance(event, TransactionReset | MessageAborted):
            self.recipients = []


class MemoryPeer:
    """Runs a ``ServerConnection`` in memory; ``chunk_size`` splits every send."""

    def __init__(self, settings: ServerSettings, *, chunk_size: int | None = None) -> None:
        self.conn = ServerConnection(settings)
        self.adapter = ScriptedAdapter(self.conn)
        self.chunk_size = chunk_size
        self.events: list[Event] = []
        self.output = bytearray()  # everything the server sent
        self._lines: deque[str] = deque()
        self._partial = b""
        kind = "LMTP" if settings.lmtp else "ESMTP"
        self.conn.greet(Reply.of(220, None, f"{settings.hostname} {kind} postillon"))
        self._pump()

    def _pieces(self, data: bytes) -> Iterator[bytes]:
        size = self.chunk_size or len(data) or 1
        for i in range(0, len(data), size):
            yield data[i : i + size]

    def _pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Event)
            self.events.append(event)
            self.adapter.handle(event)
        out = self.conn.data_to_send()
        self.output += out
        data = self._partial + out
        *lines, self._partial = data.split(b"\r\n")
        for raw in lines:
            line = raw.decode("utf-8")
            if not _REPLY_LINE.match(line):
                raise TranscriptError(f"malformed reply line from the server: {line!r}")
            self._lines.append(line)

    def send(self, data: bytes) -> None:
        for piece in self._pieces(data):
            self.conn.receive_data(piece)
            self._pump()
        if self.adapter.tls_handshake_due:
            self.adapter.tls_handshake_due = False
            if self.conn.state is State.STARTTLS:
                self.conn.tls_established()
            self._pump()

    def close(self) -> None:
        self.conn.receive_data(b"")
        self._pump()

    def read_line(self) -> str | None:
        return self._lines.popleft() if self._lines else None

    def server_closed(self) -> bool:
        return self.conn.closing

    def event_names(self) -> list[str] | None:
        return [type(e).__name__ for e in self.events]


def run_in_memory(transcript: Transcript, *, chunk_size: int | None = None) -> MemoryPeer:
    """Play ``transcript`` against a fresh in-memory server; return the peer for inspection."""
    peer = MemoryPeer(settings_from_options(transcript.options), chunk_size=chunk_size)
    play(transcript, peer)
    return peer
