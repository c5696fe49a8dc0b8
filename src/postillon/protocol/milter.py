"""The MTA side of the milter protocol (version 6, as libmilter speaks it), without I/O.

``MilterClient`` is a state machine in the style of the SMTP cores beside it: the
driver calls one method per step of the SMTP dialogue (``connect``, ``helo``,
``mail``, ``rcpt``, ``data``, ``header``, ``end_of_headers``, ``body``,
``end_of_message``, ``abort``, ``quit``, ``unknown``), writes what
``data_to_send()`` returns, and, when the method said a reply is expected, feeds
the milter's bytes to ``receive_data`` and pulls events with ``next_event`` until a
``Verdict`` arrives. Every method honours the negotiated protocol: a step the milter
asked to skip is not sent, a step it asked not to answer (SMFIP_NR_*) is sent
without waiting (rspamd asks for that even when it was not offered, so the client
offers every NR bit and honours the answer).

Anything the milter sends that breaks the protocol raises ``MilterProtocolError``:
oversized or truncated packets, unknown commands, a reply when none is due, a
modification outside end-of-message or one it did not negotiate, a bad reply code.
The driver turns that into the milter's default action; the machine then refuses
further use (``closed``).

Header values: the driver passes each field's raw text after the colon (CRLF folds
included). Without SMFIP_HDR_LEADSPC the leading white space is stripped, as
Postfix and Sendmail do, and folds are sent as bare LF (how both MTAs hand them
over). Values in header modifications come back normalised to the same raw form:
the text to put after ``Name:``, leading space included, folds as CRLF.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping, Sequence

from postillon.protocol.milter_wire import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    MAX_BODY_CHUNK,
    MAX_PACKET,
    MILTER_VERSION,
    NEVER_ANSWERED,
    NO_REPLY_FLAG,
    SKIP_FLAG,
    SMFIA_INET,
    SMFIA_INET6,
    SMFIA_UNIX,
    SMFIA_UNKNOWN,
    SMFIC_ABORT,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MACRO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    SMFIR_ACCEPT,
    SMFIR_ADDHEADER,
    SMFIR_ADDRCPT,
    SMFIR_ADDRCPT_PAR,
    SMFIR_CHGFROM,
    SMFIR_CHGHEADER,
    SMFIR_CONN_FAIL,
    SMFIR_CONTINUE,
    SMFIR_DELRCPT,
    SMFIR_DISCARD,
    SMFIR_INSHEADER,
    SMFIR_PROGRESS,
    SMFIR_QUARANTINE,
    SMFIR_REJECT,
    SMFIR_REPLBODY,
    SMFIR_REPLYCODE,
    SMFIR_SHUTDOWN,
    SMFIR_SKIP,
    SMFIR_TEMPFAIL,
    STAGE_COMMAND,
    Action,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    Event,
    InsertHeader,
    MilterProtocolError,
    Negotiated,
    Progress,
    ProtocolFlag,
    Quarantine,
    ReplaceBody,
    Stage,
    Verdict,
    nul_strings,
    packet,
    split_nul,
    split_nul_list,
)

__all__ = ["MilterClient", "MilterProtocolError", "body_chunks", "parse_reply_code"]

_SIMPLE_VERDICTS: dict[bytes, str] = {
    SMFIR_CONTINUE: "continue",
    SMFIR_ACCEPT: "accept",
    SMFIR_REJECT: "reject",
    SMFIR_TEMPFAIL: "tempfail",
    SMFIR_DISCARD: "discard",
    SMFIR_SHUTDOWN: "shutdown",
    SMFIR_CONN_FAIL: "shutdown",
}
# Which negotiated action each modification needs.
_MODIFICATION_ACTION: dict[bytes, Action] = {
    SMFIR_ADDHEADER: Action.ADDHDRS,
    SMFIR_INSHEADER: Action.ADDHDRS,
    SMFIR_CHGHEADER: Action.CHGHDRS,
    SMFIR_REPLBODY: Action.CHGBODY,
    SMFIR_CHGFROM: Action.CHGFROM,
    SMFIR_ADDRCPT: Action.ADDRCPT,
    SMFIR_ADDRCPT_PAR: Action.ADDRCPT_PAR,
    SMFIR_DELRCPT: Action.DELRCPT,
    SMFIR_QUARANTINE: Action.QUARANTINE,
}
_REPLY_LINE = re.compile(r"^([45]\d\d)([ -]?)(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
_BARE_LF = re.compile(r"(?<!\r)\n")


def body_chunks(data: bytes, size: int = MAX_BODY_CHUNK) -> Iterator[bytes]:
    """``data`` cut into pieces a milter accepts (SMFIC_BODY carries at most 65535)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def parse_reply_code(text: str) -> Verdict:
    """SMFIR_REPLYCODE's text ("550 5.7.1 Spam", or several lines joined by CRLF as
    smfi_setmlreply sends them) into a reject/tempfail ``Verdict``."""
    raw_lines = text.split("\r\n")
    code: int | None = None
    status: str | None = None
    lines: list[str] = []
    for raw in raw_lines:
        m = _REPLY_LINE.match(raw)
        if m is None:
            raise MilterProtocolError(f"reply code: bad line {raw[:60]!r}")
        line_code = int(m.group(1))
        if code is None:
            code = line_code
        elif line_code != code:
            raise MilterProtocolError("reply code: lines with different codes")
        rest = m.group(3)
        first, _, after = rest.partition(" ")
        if _ENHANCED.match(first) and first[0] == str(line_code)[0]:
            status = status or first
            rest = after
        if "\r" in rest or "\n" in rest:
            raise MilterProtocolError("reply code: CR or LF inside a line")
        # libmilter's smfi_setreply text is a format string: '%' is written '%%'.
        lines.append(rest.replace("%%", "%"))
    assert code is not None
    kind = "tempfail" if code < 500 else "reject"
    return Verdict(kind, code=code, status=status, text=tuple(lines))


_SKIP_BITS: dict[bytes, int] = {command: int(flag) for command, flag in SKIP_FLAG.items()}
_NO_REPLY_BITS: dict[bytes, int] = {command: int(flag) for command, flag in NO_REPLY_FLAG.items()}


class MilterClient:
    """One connection to one milter, from the MTA's side."""

    def __init__(
        self,
        *,
        actions: Action = ALL_ACTIONS,
        protocol: ProtocolFlag = ALL_PROTOCOL,
    ) -> None:
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.negotiated: Negotiated | None = None
        self.closed = False
        self._out = bytearray()
        self._in = bytearray()
        self._eof = False
        # The command whose answer is still due (b"O" while negotiating).
        self._pending: bytes | None = None
        self._started = False
        # True while the last thing on the wire is an end of message the milter
        # answered "continue": the one point where libmilter takes SMFIC_QUIT_NC.
        self._ended_with_continue = False

    # --- I/O seams --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending_output(self) -> int:
        """Octets queued and not yet taken by ``data_to_send`` (the driver may let
        commands that need no reply wait and send them with the next one that does)."""
        return len(self._out)

    def receive_data(self, data: bytes) -> None:
        """The milter's bytes; ``b""`` means it closed the connection."""
        if data:
            self._in += data
        else:
            self._eof = True

    @property
    def awaiting_reply(self) -> bool:
        return self._pending is not None

    def next_event(self) -> Event | None:
        """The next thing the milter said, or ``None`` when more bytes are needed."""
        if self.closed:
            raise MilterProtocolError("the milter connection is closed")
        try:
            return self._next_event()
        except MilterProtocolError:
            self.closed = True
            raise

    def _next_event(self) -> Event | None:
        if len(self._in) < 4:
            self._check_eof()
            return None
        (length,) = struct.unpack(">I", self._in[:4])
        if length == 0 or length > MAX_PACKET:
            raise MilterProtocolError(f"packet length {length} out of range")
        if len(self._in) < 4 + length:
            self._check_eof()
            return None
        command = bytes(self._in[4:5])
        data = bytes(self._in[5 : 4 + length])
        del self._in[: 4 + length]
        if self._pending is None:
            raise MilterProtocolError(f"reply {command!r} when none was due")
        if self._pending == SMFIC_OPTNEG:
            return self._negotiate(command, data)
        return self._reply(command, data)

    def _check_eof(self) -> None:
        """More bytes are needed: an error if the milter has closed while owing some."""
        if self._eof:
            what = "negotiation" if self._pending == SMFIC_OPTNEG else "a reply"
            if self._pending is not None or self._in:
                raise MilterProtocolError(f"the milter closed the connection during {what}")

    # --- negotiation ------------------------------------------------------------

    def start(self) -> None:
        """Queue SMFIC_OPTNEG: version 6, the actions and steps this client supports."""
        if self._started:
            raise RuntimeError("negotiation already started")
        self._started = True
        payload = struct.pack(
            ">III", MILTER_VERSION, int(self.offered_actions), int(self.offered_protocol)
        )
        self._out += packet(SMFIC_OPTNEG, payload)
        self._pending = SMFIC_OPTNEG

    def _negotiate(self, command: bytes, data: bytes) -> Negotiated:
        if command != SMFIC_OPTNEG:
            raise MilterProtocolError(f"expected the OPTNEG answer, got {command!r}")
        if len(data) < 12:
            raise MilterProtocolError("OPTNEG answer shorter than 12 octets")
        version, actions, protocol = struct.unpack(">III", data[:12])
        if not 2 <= version <= MILTER_VERSION:
            raise MilterProtocolError(f"milter protocol version {version} not supported")
        macros: dict[Stage, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5:
                raise MilterProtocolError("OPTNEG macro list truncated")
            (stage_number,) = struct.unpack(">I", rest[:4])
            end = rest.find(b"\0", 4)
            if end < 0:
                raise MilterProtocolError("OPTNEG macro list not NUL-terminated")
            names = rest[4:end].decode("ascii", "replace").split()
            rest = rest[end + 1 :]
            if stage_number in Stage._value2member_map_:
                macros[Stage(stage_number)] = tuple(names)
        # A milter may ask for more than was offered (rspamd sets NR bits it was not
        # offered); Postfix ignores the excess, and so does this client.
        self.negotiated = Negotiated(
            version=version,
            actions=Action(actions & int(self.offered_actions)),
            protocol=ProtocolFlag(protocol & int(self.offered_protocol)),
            macros=macros,
        )
        self._pending = None
        return self.negotiated

    # --- replies ----------------------------------------------------------------

    def _reply(self, command: bytes, data: bytes) -> Event:
        pending = self._pending
        if command == SMFIR_PROGRESS:
            return Progress()
        if command in _SIMPLE_VERDICTS:
            self._pending = None
            kind = _SIMPLE_VERDICTS[command]
            self._ended_with_continue = pending == SMFIC_BODYEOB and kind == "continue"
            return Verdict(kind)
        if command == SMFIR_REPLYCODE:
            (text,) = split_nul(data, 1, "reply code")
            self._pending = None
            return parse_reply_code(text)
        if command == SMFIR_SKIP:
            if pending != SMFIC_BODY or not self.offered_protocol & ProtocolFlag.SKIP:
                raise MilterProtocolError("skip outside the body")
            self._pending = None
            return Verdict("skip")
        needed = _MODIFICATION_ACTION.get(command)
        if needed is None:
            raise MilterProtocolError(f"unknown reply {command!r}")
        if pending != SMFIC_BODYEOB:
            raise MilterProtocolError(f"modification {command!r} before end of message")
        assert self.negotiated is not None
        if not self.negotiated.actions & needed:
            raise MilterProtocolError(f"modification {command!r} was not negotiated")
        return self._modification(command, data)

    def _modification(self, command: bytes, data: bytes) -> Event:
        if command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
            if len(data) < 4:
                raise MilterProtocolError("header change without an index")
            (index,) = struct.unpack(">I", data[:4])
            name, value = split_nul(data[4:], 2, "header change")
            _check_header_name(name)
            if command == SMFIR_INSHEADER:
                return InsertHeader(index, name, self._raw_value(value))
            return ChangeHeader(index, name, self._raw_value(value) if value else "")
        if command == SMFIR_ADDHEADER:
            name, value = split_nul(data, 2, "add header")
            _check_header_name(name)
            return AddHeader(name, self._raw_value(value))
        if command == SMFIR_REPLBODY:
            return ReplaceBody(data)
        if command == SMFIR_QUARANTINE:
            (reason,) = split_nul(data, 1, "quarantine")
            return Quarantine(reason)
        if command == SMFIR_DELRCPT:
            (address,) = split_nul(data, 1, "delete recipient")
            return DeleteRecipient(_check_address(address))
        parts = split_nul_list(data, "address")
        address, args = _check_address(parts[0]), tuple(parts[1:])
        if command == SMFIR_CHGFROM:
            return ChangeSender(address, args)
        if command == SMFIR_ADDRCPT and args:
            raise MilterProtocolError("add recipient with arguments needs ADDRCPT_PAR")
        return AddRecipient(address, args)

    def _raw_value(self, value: str) -> str:
        assert self.negotiated is not None
        value = _BARE_LF.sub("\r\n", value)
        if self.negotiated.protocol & ProtocolFlag.HDR_LEADSPC:
            return value
        return " " + value

    # --- commands ---------------------------------------------------------------

    def _send(
        self,
        command: bytes,
        data: bytes = b"",
        macros: tuple[Stage, Mapping[str, str]] | None = None,
    ) -> bool:
        """Queue one command (and its macros first); True when a reply is due."""
        if self.closed:
            raise RuntimeError("the milter connection is closed")
        if self.negotiated is None:
            raise RuntimeError("negotiate first (start, then read the answer)")
        if self._pending is not None:
            raise RuntimeError(f"a reply to {self._pending!r} is still due")
        self._ended_with_continue = False
        # Plain ints: IntFlag's & builds a flag object each time (a hot path).
        protocol = int(self.negotiated.protocol)
        if protocol & _SKIP_BITS.get(command, 0):
            return False
        if macros is not None:
            self._macros(*macros)
        self._out += packet(command, data)
        if command in NEVER_ANSWERED or protocol & _NO_REPLY_BITS.get(command, 0):
            return False
        self._pending = command
        return True

    def _macros(self, stage: Stage, values: Mapping[str, str]) -> None:
        assert self.negotiated is not None
        wanted = self.negotiated.macros.get(stage)
        pairs: list[str] = []
        if wanted is None:
            for name, value in values.items():
                pairs += [name, value]
        else:
            for name in wanted:
                found = _lookup_macro(values, name)
                if found is not None:
                    pairs += [name, found]
        if pairs:
            self._out += packet(SMFIC_MACRO, STAGE_COMMAND[stage] + nul_strings(*pairs))

    def connect(
        self,
        hostname: str,
        address: str | None,
        port: int = 0,
        *,
        family: str = "inet",
        macros: Mapping[str, str] | None = None,
    ) -> bool:
        """SMFIC_CONNECT. ``family``: "inet", "inet6", "unix" or "unknown"."""
        family_byte = {
            "inet": SMFIA_INET,
            "inet6": SMFIA_INET6,
            "unix": SMFIA_UNIX,
            "unknown": SMFIA_UNKNOWN,
        }[family]
        data = nul_strings(hostname) + family_byte
        if family_byte != SMFIA_UNKNOWN:
            data += struct.pack(">H", port & 0xFFFF) + nul_strings(address or "")
        return self._send(SMFIC_CONNECT, data, _stage(Stage.CONNECT, macros))

    def helo(self, name: str, *, macros: Mapping[str, str] | None = None) -> bool:
        return self._send(SMFIC_HELO, nul_strings(name), _stage(Stage.HELO, macros))

    def mail(
        self, sender: str, args: Sequence[str] = (), *, macros: Mapping[str, str] | None = None
    ) -> bool:
        """SMFIC_MAIL; ``sender`` in angle brackets as it was given ("<a@b>", "<>")."""
        return self._send(SMFIC_MAIL, nul_strings(sender, *args), _stage(Stage.ENVFROM, macros))

    def rcpt(
        self, recipient: str, args: Sequence[str] = (), *, macros: Mapping[str, str] | None = None
    ) -> bool:
        return self._send(SMFIC_RCPT, nul_strings(recipient, *args), _stage(Stage.ENVRCPT, macros))

    def data(self, *, macros: Mapping[str, str] | None = None) -> bool:
        return self._send(SMFIC_DATA, b"", _stage(Stage.DATA, macros))

    def header(self, name: str, value: str) -> bool:
        """One header field: ``value`` is the raw text after the colon."""
        assert self.negotiated is not None
        if not self.negotiated.protocol & ProtocolFlag.HDR_LEADSPC:
            value = value.lstrip(" \t")
        # A NUL cannot travel in a milter string; it has no business in a header.
        value = value.replace("\r\n", "\n").replace("\0", "")
        if value.endswith("\n"):
            value = value[:-1]
        return self._send(SMFIC_HEADER, nul_strings(name.replace("\0", ""), value))

    def end_of_headers(self, *, macros: Mapping[str, str] | None = None) -> bool:
        return self._send(SMFIC_EOH, b"", _stage(Stage.EOH, macros))

    def body(self, chunk: bytes) -> bool:
        """One body piece (CRLF line ends, at most 65535 octets: see ``body_chunks``)."""
        if len(chunk) > MAX_BODY_CHUNK:
            raise ValueError("body chunk longer than 65535 octets")
        return self._send(SMFIC_BODY, chunk)

    def end_of_message(self, *, macros: Mapping[str, str] | None = None) -> bool:
        return self._send(SMFIC_BODYEOB, b"", _stage(Stage.EOM, macros))

    def unknown(self, command_line: str) -> bool:
        """SMFIC_UNKNOWN: an SMTP command the MTA did not recognise."""
        return self._send(SMFIC_UNKNOWN, nul_strings(command_line))

    def abort(self) -> None:
        """SMFIC_ABORT: forget the current message (the connection stays)."""
        self._send(SMFIC_ABORT)

    def quit(self) -> None:
        self._send(SMFIC_QUIT)
        self.closed = True

    @property
    def can_quit_new_connection(self) -> bool:
        return self.may_quit_new_connection()

    def may_quit_new_connection(self, *, any_state: bool = False) -> bool:
        """Whether SMFIC_QUIT_NC may be sent now, so the connection serves a new SMTP
        session. libmilter (engine.c, ``next_states``) takes QUIT_NC only in its
        "end of message" and "unknown" states, and an end of message answered
        accept/reject/tempfail/discard puts it back to "HELO", where QUIT_NC and the
        following SMFIC_CONNECT are *silently ignored* (the MTA would wait for a reply
        that never comes). So: protocol version 6, nothing in flight, and the last
        command an end of message answered "continue". ``any_state`` drops that last
        condition, for milters that take QUIT_NC anywhere (rspamd)."""
        return (
            not self.closed
            and self.negotiated is not None
            and self.negotiated.version >= 6
            and self._pending is None
            and not self._out
            and (self._ended_with_continue or any_state)
        )

    def quit_new_connection(self, *, any_state: bool = False) -> None:
        """Queue SMFIC_QUIT_NC: the SMTP session is over, a new one follows on this
        connection with SMFIC_CONNECT (libmilter keeps the negotiated options; it
        does not expect a new SMFIC_OPTNEG)."""
        if not self.may_quit_new_connection(any_state=any_state):
            raise RuntimeError("SMFIC_QUIT_NC is only taken after an end of message")
        self._out += packet(SMFIC_QUIT_NC)
        self._ended_with_continue = False


def _stage(
    stage: Stage, macros: Mapping[str, str] | None
) -> tuple[Stage, Mapping[str, str]] | None:
    return None if macros is None else (stage, macros)


def _lookup_macro(values: Mapping[str, str], name: str) -> str | None:
    """A requested macro by its name, with or without braces ("{auth_authen}", "j")."""
    if name in values:
        return values[name]
    bare = name[1:-1] if name.startswith("{") and name.endswith("}") else name
    for candidate in (bare, "{" + bare + "}"):
        if candidate in values:
            return values[candidate]
    return None


def _check_header_name(name: str) -> None:
    # RFC 5322 §3.6.8: printable US-ASCII except colon.
    if not name or any(not 33 <= ord(c) <= 126 or c == ":" for c in name):
        raise MilterProtocolError(f"bad header name {name[:60]!r}")


def _check_address(address: str) -> str:
    if not address or any(c in address for c in "\r\n"):
        raise MilterProtocolError("bad address in a recipient or sender change")
    return address
