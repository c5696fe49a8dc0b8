"""The client's body encoding: DATA dot-stuffing and BDAT framing, streaming.

Every case runs whole, split at every position, and byte by byte: the bytes on
the wire must not depend on how the message was cut into pieces. DATA output
is also read back with the server core's ``DataReader`` (dot-unstuffing), which
must return the original content.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.core.envelope import BodyType, MailParams, RcptParams
from postillon.protocol._readers import DataReader
from postillon.protocol._writers import BodyEncoder as _BodyEncoder
from postillon.protocol.client import NEED_DATA, ClientConnection
from postillon.protocol.client_events import BodyRequested
from postillon.protocol.sasl import b64encode as _b64


def encode(pieces: list[bytes], *, stuff: bool = True, fix: bool = True) -> bytes:
    enc = _BodyEncoder(stuff=stuff, fix_line_endings=fix)
    out = b"".join(enc.encode(p, False) for p in pieces)
    return out + enc.encode(b"", True)


def splits(data: bytes) -> list[list[bytes]]:
    """Whole, cut at every position, and byte by byte."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return ways


STUFFING: list[tuple[str, bytes, bytes]] = [
    ("empty", b"", b".\r\n"),
    ("plain", b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    ("no-final-crlf", b"no newline", b"no newline\r\n.\r\n"),
    ("dot-first-line", b".a\r\n", b"..a\r\n.\r\n"),
    ("dot-inside-line", b"a.b\r\nc.\r\n", b"a.b\r\nc.\r\n.\r\n"),
    ("dot-later-line", b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    ("line-just-a-dot", b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    ("lines-just-dots", b".\r\n.\r\n", b"..\r\n..\r\n.\r\n"),
    ("body-just-a-dot", b".", b"..\r\n.\r\n"),
    ("double-dot", b"..\r\n", b"...\r\n.\r\n"),
    ("end-marker-in-content", b"x\r\n.\r\n.\r\ny", b"x\r\n..\r\n..\r\ny\r\n.\r\n"),
    ("blank-lines", b"\r\n\r\n", b"\r\n\r\n.\r\n"),
    # Bare line endings become CRLF (RFC 5321 §2.3.8) - and then are stuffed.
    ("bare-lf-dot", b"a\n.\r\n", b"a\r\n..\r\n.\r\n"),
    ("bare-lf-dot-bare-lf", b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    ("bare-cr", b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    ("trailing-bare-cr", b"a\r", b"a\r\n.\r\n"),
    ("cr-cr-lf", b"a\r\r\n", b"a\r\n\r\n.\r\n"),
    ("utf8-8bit", "héllo\r\n.ü\r\n".encode(), "héllo\r\n..ü\r\n.\r\n".encode()),
]


@pytest.mark.parametrize(("data", "wire"), [c[1:] for c in STUFFING], ids=[c[0] for c in STUFFING])
def test_dot_stuffing_any_split(data: bytes, wire: bytes) -> None:
    for pieces in splits(data):
        assert encode(pieces) == wire, pieces


@pytest.mark.parametrize(
    "pieces",
    [
        [b"a\r", b"\n.b\r\n"],  # CRLF split, dot after it
        [b"a\r\n", b".b"],  # chunk ends with CRLF
        [b"a\r\n", b".", b"\r\n"],
        [b".", b".", b"\r\n"],
        [b"x\r\n.", b"\r\n"],
        [b"x\r", b"", b"\n", b"", b".\r\n"],
    ],
)
def test_dot_stuffing_chunk_boundaries(pieces: list[bytes]) -> None:
    assert encode(pieces) == encode([b"".join(pieces)])


def unstuff(wire: bytes) -> bytes:
    reader = DataReader(0)
    buf = bytearray(wire)
    content, done = reader.read(buf)
    assert done and not buf and reader.failure is None
    return content


CRLF_BODIES = st.lists(
    st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.", b" .", b"\xc3\xa9", b".\xff"]),
    max_size=8,
).map(lambda parts: b"".join(p + b"\r\n" for p in parts))


@settings(max_examples=300, deadline=None)
@given(CRLF_BODIES, st.lists(st.integers(0, 200), max_size=6))
def test_round_trip_through_the_server_reader(data: bytes, cuts: list[int]) -> None:
    cuts = sorted(min(c, len(data)) for c in cuts)
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    wire = encode(pieces)
    assert unstuff(wire) == data
    assert wire == encode([data])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.lists(st.integers(0, 60), max_size=5))
def test_any_bytes_arrive_as_clean_lines(data: bytes, cuts: list[int]) -> None:
    data = data.replace(b"\0", b"")  # NUL is content the server refuses, not framing
    cuts = sorted(min(c, len(data)) for c in cuts)
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    wire = encode(pieces)
    assert wire == encode([data])  # chunking invariance, even with bare CR/LF
    content = unstuff(wire)  # the server accepts it: no bare CR/LF, one end marker
    crlf = content.count(b"\r\n")
    assert content.count(b"\r") == crlf == content.count(b"\n")


def test_binary_body_not_rewritten() -> None:
    data = b"a\rb\nc\r"
    assert encode([data[:3], data[3:]], stuff=False, fix=False) == data


def test_large_body_many_pieces() -> None:
    line = b"." + b"x" * 70 + b"\r\n"
    data = line * 10_000
    pieces = [data[i : i + 4093] for i in range(0, len(data), 4093)]
    wire = encode(pieces)
    assert wire == (b"." + line) * 10_000 + b".\r\n"
    assert unstuff(wire) == data


# --- BDAT framing through the connection ------------------------------------------------


def bdat_conn(
    ehlo: bytes = b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", params: MailParams | None = None
) -> ClientConnection:
    conn = ClientConnection("c.test")
    conn.receive_data(b"220 mx\r\n")
    conn.next_event()
    conn.hello()
    conn.receive_data(ehlo)
    conn.next_event()
    conn.start_transaction("a@b.test", params or MailParams(), [("c@d.test", RcptParams())])
    conn.receive_data(b"250 ok\r\n250 ok\r\n")
    while not isinstance(ev := conn.next_event(), BodyRequested):
        assert ev is not NEED_DATA
    conn.data_to_send()
    return conn


def test_bdat_framing_no_stuffing() -> None:
    conn = bdat_conn()
    conn.send_body(b".first\r\n")
    conn.send_body(b"")  # an empty piece is no chunk (BDAT 0 only with LAST)
    conn.send_body(b".\r\n")
    conn.send_body(b"end", last=True)  # no final CRLF added for BDAT
    assert conn.data_to_send() == (b"BDAT 8\r\n.first\r\nBDAT 3\r\n.\r\nBDAT 3 LAST\r\nend")


def test_bdat_empty_last_chunk() -> None:
    conn = bdat_conn()
    conn.send_body(b"abc\r\n")
    conn.send_body(b"", last=True)
    assert conn.data_to_send() == b"BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n"


def test_bdat_bare_line_endings_fixed_and_counted() -> None:
    conn = bdat_conn()
    conn.send_body(b"a\nb\r")
    conn.send_body(b"\nc", last=True)
    assert conn.data_to_send() == b"BDAT 4\r\na\r\nbBDAT 3 LAST\r\n\r\nc"


def test_binarymime_bdat_untouched() -> None:
    conn = bdat_conn(
        b"250-mx\r\n250-PIPELINING\r\n250-BINARYMIME\r\n250 CHUNKING\r\n",
        MailParams(body=BodyType.BINARY_MIME),
    )
    conn.send_body(b"\x00\r\xff\n", last=True)
    assert conn.data_to_send() == b"BDAT 4 LAST\r\n\x00\r\xff\n"


# --- SASL base64 without the base64 module (protocol/ imports no codecs) ----------------


@pytest.mark.parametrize(
    "data",
    [b"", b"a", b"ab", b"abc", b"abcd", b"\0joe\0secret", bytes(range(256)), "pässwörd".encode()],
)
def test_b64_matches_stdlib(data: bytes) -> None:
    assert _b64(data) == base64.b64encode(data).decode()
