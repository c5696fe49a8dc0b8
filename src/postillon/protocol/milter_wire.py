"""The milter protocol's wire format (version 6, as Sendmail's libmilter speaks it).

Constants carry libmilter's names (``mfdef.h``) so a reader can check them against it.
A packet is a 4-byte big-endian length, then the command byte, then ``length - 1``
bytes of data. Strings are NUL-terminated. Nothing here does I/O; ``milter.py`` holds
the state machine, and this file the values it exchanges.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

MILTER_VERSION = 6
# libmilter's MILTER_CHUNK_SIZE: body chunks the MTA sends are at most this long.
MAX_BODY_CHUNK = 65535
# The largest packet accepted from a milter. libmilter's own limit is 1 MiB of data
# (MILTER_MDS_1M) plus framing; anything longer is garbage, not a big reply.
MAX_PACKET = (1 << 20) + 64


# Commands the MTA sends (SMFIC_*).
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies and actions the milter sends (SMFIR_*).
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Address families in SMFIC_CONNECT (SMFIA_*).
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"


class Action(IntFlag):
    """What a milter may change (SMFIF_*), offered by the MTA in OPTNEG."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


ALL_ACTIONS = Action(0x1FF)


class ProtocolFlag(IntFlag):
    """Steps a milter may ask to skip or not answer (SMFIP_*)."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


# Everything this client understands. RCPT_REJ (sending rejected recipients too)
# is left out: the session never hands a rejected recipient to a milter.
ALL_PROTOCOL = ProtocolFlag(0x1FFFFF & ~ProtocolFlag.RCPT_REJ)


class Stage(IntEnum):
    """Macro stages a milter may name in OPTNEG (SMFIM_*), each with its command."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


STAGE_COMMAND: dict[Stage, bytes] = {
    Stage.CONNECT: SMFIC_CONNECT,
    Stage.HELO: SMFIC_HELO,
    Stage.ENVFROM: SMFIC_MAIL,
    Stage.ENVRCPT: SMFIC_RCPT,
    Stage.DATA: SMFIC_DATA,
    Stage.EOM: SMFIC_BODYEOB,
    Stage.EOH: SMFIC_EOH,
}

# For each command: the flag that skips it, and the flag that says "no reply".
SKIP_FLAG: dict[bytes, ProtocolFlag] = {
    SMFIC_CONNECT: ProtocolFlag.NOCONNECT,
    SMFIC_HELO: ProtocolFlag.NOHELO,
    SMFIC_MAIL: ProtocolFlag.NOMAIL,
    SMFIC_RCPT: ProtocolFlag.NORCPT,
    SMFIC_DATA: ProtocolFlag.NODATA,
    SMFIC_HEADER: ProtocolFlag.NOHDRS,
    SMFIC_EOH: ProtocolFlag.NOEOH,
    SMFIC_BODY: ProtocolFlag.NOBODY,
    SMFIC_UNKNOWN: ProtocolFlag.NOUNKNOWN,
}
NO_REPLY_FLAG: dict[bytes, ProtocolFlag] = {
    SMFIC_CONNECT: ProtocolFlag.NR_CONN,
    SMFIC_HELO: ProtocolFlag.NR_HELO,
    SMFIC_MAIL: ProtocolFlag.NR_MAIL,
    SMFIC_RCPT: ProtocolFlag.NR_RCPT,
    SMFIC_DATA: ProtocolFlag.NR_DATA,
    SMFIC_HEADER: ProtocolFlag.NR_HDR,
    SMFIC_EOH: ProtocolFlag.NR_EOH,
    SMFIC_BODY: ProtocolFlag.NR_BODY,
    SMFIC_UNKNOWN: ProtocolFlag.NR_UNKN,
}
# Commands that never get a reply, whatever was negotiated.
NEVER_ANSWERED = frozenset({SMFIC_MACRO, SMFIC_ABORT, SMFIC_QUIT, SMFIC_QUIT_NC})


class MilterProtocolError(Exception):
    """The milter broke the protocol (garbage, a reply out of turn, a bad payload).

    The only exception the state machine raises for the peer's bytes; the driver
    turns it into the milter's ``default_action``."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One framed packet: length (command byte included), command, data."""
    return struct.pack(">I", len(data) + 1) + command + data


def nul_strings(*parts: str | bytes) -> bytes:
    """Each part NUL-terminated; str parts as UTF-8 (milters see raw header octets)."""
    # One join and one encode for the whole packet (a hot path: every command and
    # every macro list); a NUL inside a part shows as one NUL too many.
    if not parts:
        return b""
    raw = b"\0".join(
        [p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p for p in parts]
    )
    if raw.count(0) != len(parts) - 1:
        raise ValueError("a milter string must not contain NUL")
    return raw + b"\0"


def split_nul(data: bytes, count: int, what: str) -> list[str]:
    """Exactly ``count`` NUL-terminated strings, decoded leniently; else a protocol error."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated")
    parts = data[:-1].split(b"\0")
    if len(parts) != count:
        raise MilterProtocolError(f"{what}: expected {count} strings, got {len(parts)}")
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def split_nul_list(data: bytes, what: str) -> list[str]:
    """One or more NUL-terminated strings (an address and its ESMTP arguments)."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated")
    return [p.decode("utf-8", "surrogateescape") for p in data[:-1].split(b"\0")]


# --- Events: what the milter said ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's OPTNEG answer, already masked to what this client offered."""

    version: int
    actions: Action
    protocol: ProtocolFlag
    # Macro names the milter wants per stage (SMFIR_SETSYMLIST inside OPTNEG);
    # empty when it said nothing, so the client sends its defaults.
    macros: dict[Stage, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The milter's answer to one command.

    ``kind``: "continue", "accept", "reject", "tempfail", "discard", "skip" (stop
    sending body chunks), or "shutdown" (SMFIR_SHUTDOWN/SMFIR_CONN_FAIL: the milter
    gives up on this connection, which the driver treats as a tempfail).
    ``code``/``status``/``text``: for SMFIR_REPLYCODE, the milter's own reply
    (``kind`` is then "reject" for 5xx, "tempfail" for 4xx)."""

    kind: str
    code: int | None = None
    status: str | None = None
    text: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: the milter is still working; restart the reply timeout."""


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str  # as it follows the colon, leading white space included


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int  # position among all header fields, 0 = first
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) field of this name; ``value == ""`` deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """One piece of the new body; the pieces of one message concatenate."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class ChangeSender:
    address: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


Modification = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | ReplaceBody
    | ChangeSender
    | AddRecipient
    | DeleteRecipient
    | Quarantine
)
Event = Negotiated | Verdict | Progress | Modification
