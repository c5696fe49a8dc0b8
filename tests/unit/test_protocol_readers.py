"""The framing readers: command lines, the DATA body, BDAT chunks.

Each case runs three ways (h11 ``tests/test_io.py`` ``tr()`` idea): the input
whole, byte by byte, and whole followed by trailing bytes that must be left in
the buffer untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol._readers import (
    BdatBody,
    ChunkReader,
    DataReader,
    discard_line,
    has_bare_line_ending,
    read_line,
)

TRAILING = b"NOOP\r\nRSET\r\n"


def feed_data(
    chunks: Iterable[bytes], max_size: int = 0
) -> tuple[bytes, bool, Reply | None, bytes]:
    """Feed ``chunks`` to a DataReader as a connection would; (content, done, failure, leftover)."""
    reader = DataReader(max_size)
    buf = bytearray()
    content = bytearray()
    done = False
    for chunk in chunks:
        buf += chunk
        if not done:
            data, done = reader.read(buf)
            content += data
    return bytes(content), done, reader.failure, bytes(buf)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def tr_data(
    data: bytes, content: bytes | None, failure: Reply | None = None, max_size: int = 0
) -> None:
    """Run a complete body (end marker included) whole, byte by byte and with trailing bytes."""
    for chunks, leftover in (
        ([data], b""),
        (bytewise(data), b""),
        ([data + TRAILING], TRAILING),
        ([*bytewise(data), TRAILING], TRAILING),
    ):
        got, done, fault, rest = feed_data(chunks, max_size)
        assert done, chunks
        assert fault == failure
        assert rest == leftover
        if failure is None:
            assert got == content
        else:
            assert got == b"" or len(chunks) > 1  # content before a fault depends on chunking


# --- DATA ------------------------------------------------------------------------

GOOD_BODIES = [
    (b".\r\n", b""),  # DATA then "." at once: empty message
    (b"\r\n.\r\n", b"\r\n"),  # one empty line
    (b"a\r\n.\r\n", b"a\r\n"),
    (b"a\r\nb\r\n\r\n.\r\n", b"a\r\nb\r\n\r\n"),
    (b"..a\r\n.\r\n", b".a\r\n"),  # dot-stuffed first line
    (b"..\r\n.\r\n", b".\r\n"),
    (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
    (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n"),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),  # lenient: a lone leading dot is removed
    (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n"),
    (b"a.\r\n.b.\r\n.\r\n", b"a.\r\nb.\r\n"),
    (b"x" * 5000 + b"\r\n.\r\n", b"x" * 5000 + b"\r\n"),
    ("Grüße\r\n.\r\n".encode(), "Grüße\r\n".encode()),
    (b"\t\x7f\xff\r\n.\r\n", b"\t\x7f\xff\r\n"),  # 8-bit data is passed on as is
]


@pytest.mark.parametrize(("data", "content"), GOOD_BODIES)
def test_data_body(data: bytes, content: bytes) -> None:
    tr_data(data, content)


SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n\x00\r\n",
]


@pytest.mark.parametrize("marker", SMUGGLING, ids=repr)
def test_smuggled_end_markers_never_end_data(marker: bytes) -> None:
    smuggled = b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<y@victim.test>\r\nDATA\r\nevil\r\n"
    data = b"Subject: x\r\n\r\nhello" + marker + smuggled + b".\r\n"
    expected = R.BODY_NUL if b"\x00" in marker else R.BODY_BARE_LINE_ENDING
    tr_data(data, None, expected)


@pytest.mark.parametrize(
    ("data", "failure"),
    [
        (b"a\nb\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
        (b"a\rb\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
        (b"\n.\r\n.\r\n", R.BODY_BARE_LINE_ENDING),  # "\n.\r\n" is not an end
        (b"a\r\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
        (b"a\r\n\n.\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
        (b"a\x00\r\n.\r\n", R.BODY_NUL),
    ],
)
def test_data_faults(data: bytes, failure: Reply) -> None:
    tr_data(data, None, failure)


def test_data_size_limit_counts_unstuffed_content() -> None:
    tr_data(b"123\r\n.\r\n", b"123\r\n", max_size=5)
    tr_data(b"..3\r\n.\r\n", b".3\r\n", max_size=4)  # 5 octets on the wire, 4 content
    tr_data(b"1234\r\n.\r\n", None, R.MESSAGE_TOO_BIG, max_size=5)


def test_data_incomplete_holds_back_a_possible_marker() -> None:
    for data, content, held in [
        (b"abc", b"abc", b""),
        (b"abc\r", b"abc", b"\r"),
        (b"abc\r\n", b"abc", b"\r\n"),
        (b"abc\r\n.", b"abc", b"\r\n."),
        (b"abc\r\n.\r", b"abc", b"\r\n.\r"),
        (b".", b"", b"."),
        (b".\r", b"", b".\r"),
    ]:
        for chunks in ([data], bytewise(data)):
            got, done, fault, rest = feed_data(chunks)
            assert (got, done, fault, rest) == (content, False, None, held), (data, chunks)


def test_data_streams_in_chunks() -> None:
    """Only what arrived is handed on: the reader never waits for the whole body."""
    reader = DataReader(0)
    buf = bytearray(b"line 1\r\nline")
    assert reader.read(buf) == (b"line 1\r\nline", False)
    buf += b" 2\r\n"
    assert reader.read(buf) == (b" 2", False)
    buf += b".\r\nMAIL"
    assert reader.read(buf) == (b"\r\n", True)
    assert buf == b"MAIL"


def test_data_every_split_point() -> None:
    data = b"..a\r\nb\r\n..\r\n.c\r\n\r\n.\r\nNEXT"
    expected = b".a\r\nb\r\n.\r\nc\r\n\r\n"
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            got, done, fault, rest = feed_data([data[:i], data[i:j], data[j:]])
            assert (got, done, fault, rest) == (expected, True, None, b"NEXT"), (i, j)


# --- BDAT --------------------------------------------------------------------------


def feed_chunks(
    chunks: list[tuple[bytes, bool]], pieces: int | None = None
) -> tuple[bytes, Reply | None, bytes]:
    """BDAT chunks (content, last) through ChunkReaders; (content, failure, leftover)."""
    body = BdatBody()
    wire = bytearray()
    for content, _ in chunks:
        wire += content
    wire += TRAILING
    stream = (
        [bytes(wire)]
        if pieces is None
        else [bytes(wire[i : i + pieces]) for i in range(0, len(wire), pieces)]
    )
    buf = bytearray()
    out = bytearray()
    readers = [ChunkReader(len(c), last, body) for c, last in chunks]
    for piece in stream:
        buf += piece
        while readers:
            data, done = readers[0].read(buf)
            out += data
            if not done:
                break
            if readers.pop(0).last:
                body.finish()
    assert not readers
    return bytes(out), body.failure, bytes(buf)


@pytest.mark.parametrize(
    ("chunks", "failure"),
    [
        ([(b"hello\r\n", True)], None),
        ([(b"", True)], None),
        ([(b"a\r", False), (b"\nb\r\n", True)], None),  # CRLF across chunks
        ([(b"a\r", False), (b"", False), (b"\n", True)], None),
        ([(b"a", False), (b"\r\n", True)], None),
        ([(b".\r\n", True)], None),  # no dot-unstuffing, no end marker in BDAT
        ([(b"a\nb", True)], R.BODY_BARE_LINE_ENDING),
        ([(b"a\r", False), (b"b", True)], R.BODY_BARE_LINE_ENDING),
        ([(b"a\r", True)], R.BODY_BARE_LINE_ENDING),  # CR at the very end
        ([(b"a", False), (b"\nb", True)], R.BODY_BARE_LINE_ENDING),
        ([(b"a\x00\r\n", True)], R.BODY_NUL),
        ([(b"\n.\n", False), (b"x", True)], R.BODY_BARE_LINE_ENDING),
    ],
)
def test_bdat_chunks(chunks: list[tuple[bytes, bool]], failure: Reply | None) -> None:
    expected = b"".join(c for c, _ in chunks)
    for pieces in (None, 1, 3):
        content, fault, rest = feed_chunks(chunks, pieces)
        assert fault == failure
        assert rest == TRAILING  # exactly the announced octets were consumed
        if failure is None:
            assert content == expected


def test_discarding_chunk_reader_consumes_exactly() -> None:
    reader = ChunkReader(6, True, None)
    buf = bytearray(b"QUI")
    assert reader.read(buf) == (b"", False)
    buf += b"T\r\nNOOP\r\n"
    assert reader.read(buf) == (b"", True)
    assert buf == b"NOOP\r\n"


def test_zero_chunk_is_done_without_input() -> None:
    assert ChunkReader(0, True, BdatBody()).read(bytearray()) == (b"", True)


# --- command lines -----------------------------------------------------------------


def test_read_line() -> None:
    buf = bytearray(b"NOOP\r\nRSET\r\nQU")
    assert read_line(buf, 512) == b"NOOP"
    assert read_line(buf, 512) == b"RSET"
    assert read_line(buf, 512) is None
    assert buf == b"QU"


def test_read_line_limit_includes_crlf() -> None:
    limit = 512
    ok = b"x" * (limit - 2) + b"\r\n"
    assert read_line(bytearray(ok), limit) == b"x" * (limit - 2)
    too_long = bytearray(b"x" * (limit - 1) + b"\r\n")
    assert read_line(too_long, limit) is None
    assert len(too_long) >= limit  # the caller's cue to discard


def test_discard_line_keeps_a_trailing_cr() -> None:
    buf = bytearray(b"xxxx\r")
    assert discard_line(buf) is False
    assert buf == b"\r"
    buf += b"\nNOOP\r\n"
    assert discard_line(buf) is True
    assert buf == b"NOOP\r\n"
    buf = bytearray(b"xx\nyy")
    assert discard_line(buf) is False
    assert buf == b""


def test_has_bare_line_ending() -> None:
    assert not has_bare_line_ending(b"a\r\nb\r\n")
    assert has_bare_line_ending(b"a\nb")
    assert has_bare_line_ending(b"a\rb")
    assert not has_bare_line_ending(b"a\r\n\x00")
    assert not has_bare_line_ending(b"\n\r\n", 1)


@pytest.mark.parametrize(
    ("data", "failure"),
    [
        (b"\x00\n\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
        (b"\x00" + b"x" * 20 + b"\r\n.\r\n", R.BODY_NUL),
        (b"x" * 20 + b"\r\n\x00\r\n.\r\n", R.BODY_NUL),
        (b"x" * 20 + b"\r\nab\ncd\r\n.\r\n", R.BODY_BARE_LINE_ENDING),
    ],
)
def test_fault_priority_does_not_depend_on_packets(data: bytes, failure: Reply) -> None:
    """Bare CR/LF before NUL before size, wherever each occurs in the message."""
    tr_data(data, None, failure, max_size=10)
