"""The sans-IO milter client (protocol/milter.py), byte by byte.

Expected bytes are written out by hand from libmilter's mfdef.h and engine.c (the
same framing pymilter's reference milter answers in tests/integration/test_milter_*).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.protocol.milter import MilterClient, body_chunks, parse_reply_code
from postillon.protocol.milter_wire import (
    ALL_PROTOCOL,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    MilterProtocolError,
    Negotiated,
    Progress,
    ProtocolFlag,
    Quarantine,
    ReplaceBody,
    Stage,
    Verdict,
    packet,
)


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def optneg(actions: int = 0x1FF, protocol: int = 0, version: int = 6, extra: bytes = b"") -> bytes:
    return pkt(b"O", struct.pack(">III", version, actions, protocol) + extra)


def feed(client: MilterClient, data: bytes, *, bytewise: bool = False) -> list[object]:
    """Feed ``data`` (whole or one byte at a time) and collect every event."""
    events: list[object] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        client.receive_data(piece)
        while (event := client.next_event()) is not None:
            events.append(event)
    return events


def negotiated(protocol: int = 0, actions: int = 0x1FF, extra: bytes = b"") -> MilterClient:
    client = MilterClient()
    client.start()
    client.data_to_send()
    feed(client, optneg(actions, protocol, extra=extra))
    return client


def test_optneg_offer_bytes() -> None:
    client = MilterClient()
    client.start()
    offered = int(ALL_PROTOCOL)
    assert offered == 0x1FF7FF  # every step flag, every NR bit, HDR_LEADSPC; not RCPT_REJ
    assert client.data_to_send() == (
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xf7\xff"
    )
    assert client.awaiting_reply


@pytest.mark.parametrize("bytewise", [False, True])
def test_optneg_answer_with_macro_lists(bytewise: bool) -> None:
    client = MilterClient()
    client.start()
    client.data_to_send()
    extra = (
        struct.pack(">I", 0) + b"{client_addr} j\0" + struct.pack(">I", 2) + b"i {auth_authen}\0"
    )
    # rspamd answers with NR bits too, and asks for RCPT_REJ, which was not offered.
    events = feed(client, optneg(0x1FF, 0xFF080 | 0x800, extra=extra), bytewise=bytewise)
    assert events == [
        Negotiated(
            version=6,
            actions=client.offered_actions,
            protocol=ProtocolFlag(0xFF080),
            macros={Stage.CONNECT: ("{client_addr}", "j"), Stage.ENVFROM: ("i", "{auth_authen}")},
        )
    ]
    assert not client.awaiting_reply


def test_connect_helo_mail_rcpt_bytes_and_macros() -> None:
    client = negotiated()
    assert client.connect(
        "client.example",
        "192.0.2.1",
        4444,
        macros={"j": "mx.example", "{client_addr}": "192.0.2.1"},
    )
    assert client.data_to_send() == (
        pkt(b"D", b"Cj\0mx.example\0{client_addr}\x00192.0.2.1\0")
        + pkt(b"C", b"client.example\x004\x11\x5c192.0.2.1\x00")
    )
    assert feed(client, pkt(b"c")) == [Verdict("continue")]
    assert client.helo("client.example")
    assert client.data_to_send() == pkt(b"H", b"client.example\0")
    feed(client, pkt(b"c"))
    assert client.mail("<a@example.net>", ["SIZE=10", "BODY=8BITMIME"])
    assert client.data_to_send() == pkt(b"M", b"<a@example.net>\0SIZE=10\0BODY=8BITMIME\0")
    feed(client, pkt(b"c"))
    assert client.rcpt("<b@example.org>")
    assert client.data_to_send() == pkt(b"R", b"<b@example.org>\0")
    assert feed(client, pkt(b"y", b"550 5.1.1 No such user\0")) == [
        Verdict("reject", 550, "5.1.1", ("No such user",))
    ]


def test_connect_families() -> None:
    client = negotiated()
    client.connect("h", "2001:db8::1", 25, family="inet6")
    assert client.data_to_send() == pkt(b"C", b"h\x006\x00\x192001:db8::1\0")
    feed(client, pkt(b"c"))
    client = negotiated()
    client.connect("localhost", None, family="unknown")
    assert client.data_to_send() == pkt(b"C", b"localhost\0U")


def test_macros_narrowed_to_the_milters_list() -> None:
    extra = struct.pack(">I", 2) + b"i {auth_authen}\0"
    client = negotiated(extra=extra)
    client.mail("<a@b>", macros={"i": "Q1", "auth_authen": "alice", "{mail_addr}": "a@b"})
    # Only the names asked for, spelled as the milter spelled them (braces or not).
    assert client.data_to_send().startswith(pkt(b"D", b"Mi\0Q1\0{auth_authen}\0alice\0"))


def test_skipped_steps_and_no_reply_steps() -> None:
    flags = ProtocolFlag.NOHELO | ProtocolFlag.NR_CONN | ProtocolFlag.NR_HDR | ProtocolFlag.NOBODY
    client = negotiated(int(flags))
    assert client.connect("h", "127.0.0.1", 1) is False  # sent, no reply due
    assert client.data_to_send().endswith(b"127.0.0.1\0")
    assert client.helo("h") is False  # not sent at all
    assert client.data_to_send() == b""
    assert client.header("Subject", " hi") is False
    assert client.data_to_send() == pkt(b"L", b"Subject\0hi\0")
    assert client.body(b"x") is False
    assert client.data_to_send() == b""
    assert client.end_of_message() is True
    assert client.data_to_send() == pkt(b"E")


def test_header_leading_space_and_folding() -> None:
    client = negotiated(int(ProtocolFlag.HDR_LEADSPC))
    client.header("Subject", " folded\r\n line")
    assert client.data_to_send() == pkt(b"L", b"Subject\0 folded\n line\0")
    feed(client, pkt(b"c"))
    client.end_of_headers()
    client.data_to_send()
    feed(client, pkt(b"c"))
    client.end_of_message()
    # With HDR_LEADSPC the value comes back exactly as it follows the colon ...
    assert feed(client, pkt(b"h", b"X-A\0  two spaces\0") + pkt(b"c")) == [
        AddHeader("X-A", "  two spaces"),
        Verdict("continue"),
    ]
    # ... without, one space is put back; folds come back as CRLF.
    client = negotiated()
    client.end_of_message()
    assert feed(client, pkt(b"h", b"X-B\0v\n\tw\0") + pkt(b"a")) == [
        AddHeader("X-B", " v\r\n\tw"),
        Verdict("accept"),
    ]


def test_every_modification_at_end_of_message() -> None:
    client = negotiated()
    client.end_of_message()
    assert client.data_to_send() == pkt(b"E")
    reply = (
        pkt(b"h", b"X-Spam\0yes\0")
        + pkt(b"i", struct.pack(">I", 0) + b"Authentication-Results\0mx; dkim=pass\0")
        + pkt(b"m", struct.pack(">I", 2) + b"Subject\0new\0")
        + pkt(b"m", struct.pack(">I", 1) + b"X-Old\0\0")
        + pkt(b"b", b"new body part 1\r\n")
        + pkt(b"b", b"part 2\r\n")
        + pkt(b"e", b"<s@example.net>\0SIZE=5\0")
        + pkt(b"+", b"<r@example.org>\0")
        + pkt(b"2", b"<r2@example.org>\0NOTIFY=NEVER\0")
        + pkt(b"-", b"<old@example.org>\0")
        + pkt(b"q", b"suspicious\0")
        + pkt(b"p")
        + pkt(b"c")
    )
    for bytewise in (False, True):
        c = negotiated()
        c.end_of_message()
        assert feed(c, reply, bytewise=bytewise) == [
            AddHeader("X-Spam", " yes"),
            InsertHeader(0, "Authentication-Results", " mx; dkim=pass"),
            ChangeHeader(2, "Subject", " new"),
            ChangeHeader(1, "X-Old", ""),
            ReplaceBody(b"new body part 1\r\n"),
            ReplaceBody(b"part 2\r\n"),
            ChangeSender("<s@example.net>", ("SIZE=5",)),
            AddRecipient("<r@example.org>"),
            AddRecipient("<r2@example.org>", ("NOTIFY=NEVER",)),
            DeleteRecipient("<old@example.org>"),
            Quarantine("suspicious"),
            Progress(),
            Verdict("continue"),
        ]


@pytest.mark.parametrize(
    ("command", "kind"),
    [(b"a", "accept"), (b"r", "reject"), (b"t", "tempfail"), (b"d", "discard"), (b"4", "shutdown")],
)
def test_simple_verdicts(command: bytes, kind: str) -> None:
    client = negotiated()
    client.mail("<a@b>")
    assert feed(client, pkt(command)) == [Verdict(kind)]
    assert not client.awaiting_reply


def test_skip_only_in_the_body() -> None:
    client = negotiated()
    assert client.body(b"chunk")
    assert feed(client, pkt(b"s")) == [Verdict("skip")]
    client.mail("<a@b>")
    with pytest.raises(MilterProtocolError, match="skip"):
        feed(client, pkt(b"s"))


def test_reply_codes() -> None:
    assert parse_reply_code("451 4.7.1 Try later") == Verdict(
        "tempfail", 451, "4.7.1", ("Try later",)
    )
    assert parse_reply_code("554 no status here") == Verdict(
        "reject", 554, None, ("no status here",)
    )
    assert parse_reply_code("550-5.7.1 first\r\n550 5.7.1 second") == Verdict(
        "reject", 550, "5.7.1", ("first", "second")
    )
    assert parse_reply_code("550 5.7.1 100%% sure").text == ("100% sure",)
    # A status of another class is text, not a status.
    assert parse_reply_code("550 4.7.1 odd").status is None
    for bad in ("250 2.0.0 ok", "55", "abc", "550 a\r\n451 b"):
        with pytest.raises(MilterProtocolError):
            parse_reply_code(bad)


@pytest.mark.parametrize(
    ("setup", "garbage", "match"),
    [
        ("mail", pkt(b"h", b"X\0y\0"), "before end of message"),
        ("mail", pkt(b"Z"), "unknown reply"),
        ("idle", pkt(b"c"), "none was due"),
        ("eom", struct.pack(">I", 0), "length 0"),
        ("eom", struct.pack(">I", 1 << 30), "out of range"),
        ("eom", pkt(b"i", b"\0\0"), "without an index"),
        ("eom", pkt(b"h", b"X-A\0no-terminator"), "NUL-terminated"),
        ("eom", pkt(b"h", b"Bad Name\0v\0"), "bad header name"),
        ("eom", pkt(b"h", b"OnlyOne\0"), "expected 2"),
        ("eom", pkt(b"y", b"250 ok\0"), "bad line"),
        ("eom", pkt(b"+", b"<r@x>\0ARG\0"), "ADDRCPT_PAR"),
        ("eom", pkt(b"-", b"\0"), "bad address"),
    ],
)
def test_garbage_is_a_protocol_error(setup: str, garbage: bytes, match: str) -> None:
    client = negotiated()
    if setup == "mail":
        client.mail("<a@b>")
    elif setup == "eom":
        client.end_of_message()
    with pytest.raises(MilterProtocolError, match=match):
        feed(client, garbage)
    assert client.closed


def test_modification_not_negotiated() -> None:
    client = negotiated(actions=0x01)  # ADDHDRS only
    client.end_of_message()
    with pytest.raises(MilterProtocolError, match="not negotiated"):
        feed(client, pkt(b"b", b"new body"))


@pytest.mark.parametrize(
    "answer",
    [
        pkt(b"c"),
        pkt(b"O", b"\0\0\0\x06"),
        optneg(version=1),
        optneg(version=7),
        optneg(extra=b"\0\0\0\0abc"),
        optneg(extra=b"\0\0"),
    ],
)
def test_bad_negotiation(answer: bytes) -> None:
    client = MilterClient()
    client.start()
    with pytest.raises(MilterProtocolError):
        feed(client, answer)


def test_close_mid_dialogue() -> None:
    client = negotiated()
    client.mail("<a@b>")
    client.receive_data(pkt(b"c")[:3])
    assert client.next_event() is None
    client.receive_data(b"")
    with pytest.raises(MilterProtocolError, match="closed"):
        client.next_event()


def test_clean_close_when_nothing_is_due() -> None:
    client = negotiated()
    client.receive_data(b"")
    assert client.next_event() is None


def test_abort_quit_and_misuse() -> None:
    client = negotiated()
    client.mail("<a@b>")
    with pytest.raises(RuntimeError, match="still due"):
        client.rcpt("<c@d>")
    client.data_to_send()
    feed(client, pkt(b"c"))
    client.abort()
    assert client.data_to_send() == pkt(b"A")
    assert not client.awaiting_reply
    client.unknown("XYZZY")
    assert client.data_to_send() == pkt(b"U", b"XYZZY\0")
    feed(client, pkt(b"c"))
    client.quit()
    assert client.data_to_send() == pkt(b"Q")
    assert client.closed
    with pytest.raises(RuntimeError):
        client.helo("again")


def test_body_chunks_at_most_65535() -> None:
    data = b"x" * (65535 * 2 + 10)
    chunks = list(body_chunks(data))
    assert [len(c) for c in chunks] == [65535, 65535, 10]
    client = negotiated()
    with pytest.raises(ValueError):
        client.body(data)


def test_packet_helper() -> None:
    assert packet(b"Q") == b"\x00\x00\x00\x01Q"


# -- hypothesis: random bytes from the milter never hang or crash the client ---------
REPLY_COMMANDS = [*b"+-24abcdefhilmpqrsty", ord("O"), ord("Z")]


@st.composite
def milter_packets(draw: st.DrawFn) -> bytes:
    """A stream of packets, some well-formed, some not, some truncated."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["packet", "raw"]))
        if kind == "packet":
            cmd = bytes([draw(st.sampled_from(REPLY_COMMANDS))])
            data = draw(st.binary(max_size=40))
            out += pkt(cmd, data)
        else:
            out += draw(st.binary(max_size=12))
    return out


@settings(max_examples=400, deadline=None)
@given(
    stage=st.sampled_from(["negotiate", "mail", "body", "eom", "idle"]),
    stream=milter_packets(),
    close=st.booleans(),
    split=st.integers(1, 7),
)
def test_random_packets_raise_a_clean_protocol_error(
    stage: str, stream: bytes, close: bool, split: int
) -> None:
    client = MilterClient()
    client.start()
    client.data_to_send()
    if stage != "negotiate":
        feed(client, optneg(protocol=0))
        if stage == "mail":
            client.mail("<a@b>")
        elif stage == "body":
            client.body(b"x")
        elif stage == "eom":
            client.end_of_message()
    try:
        for i in range(0, len(stream), split):
            client.receive_data(stream[i : i + split])
            # Bounded: each event consumes at least one whole packet from the buffer.
            for _ in range(len(stream) + 1):
                event = client.next_event()
                if event is None:
                    break
                assert isinstance(
                    event,
                    Negotiated
                    | Verdict
                    | Progress
                    | AddHeader
                    | InsertHeader
                    | ChangeHeader
                    | ReplaceBody
                    | ChangeSender
                    | AddRecipient
                    | DeleteRecipient
                    | Quarantine,
                )
                if isinstance(event, Verdict) and client.awaiting_reply is False:
                    # A verdict ends the exchange; anything after it is out of turn.
                    pass
            else:
                raise AssertionError("next_event did not settle")
        if close:
            client.receive_data(b"")
            client.next_event()
    except MilterProtocolError:
        assert client.closed


def test_nul_in_a_header_is_dropped() -> None:
    client = negotiated()
    client.header("X-A\0", " a\0b")
    assert client.data_to_send() == pkt(b"L", b"X-A\0ab\0")


def _one_message(client: MilterClient, eom_answer: bytes) -> None:
    client.mail("<a@b>")
    client.data_to_send()
    feed(client, pkt(b"c"))
    client.end_of_message()
    client.data_to_send()
    feed(client, pkt(eom_answer))


def test_quit_new_connection_only_after_an_end_of_message_answered_continue() -> None:
    """libmilter takes SMFIC_QUIT_NC only in its end-of-message state; after an accept
    (or reject, tempfail, discard) it silently ignores QUIT_NC and the next CONNECT."""
    client = negotiated()
    assert not client.can_quit_new_connection  # nothing happened yet
    client.connect("host", "192.0.2.1", 25)
    client.data_to_send()
    feed(client, pkt(b"c"))
    assert not client.can_quit_new_connection  # connect state: QUIT_NC would be ignored
    _one_message(client, b"c")
    assert client.can_quit_new_connection
    client.quit_new_connection()
    assert client.data_to_send() == pkt(b"K")
    assert not client.closed and client.negotiated is not None
    # The next session starts with CONNECT on the same negotiation, no OPTNEG.
    assert client.connect("host2", "192.0.2.2", 25)
    assert client.data_to_send() == pkt(
        b"C", b"host2\x004" + struct.pack(">H", 25) + b"192.0.2.2\x00"
    )
    feed(client, pkt(b"c"))
    _one_message(client, b"a")  # accepted: libmilter is back in its HELO state
    assert not client.can_quit_new_connection
    with pytest.raises(RuntimeError, match="only taken after an end of message"):
        client.quit_new_connection()


@pytest.mark.parametrize("after", ["mail", "abort", "version2"])
def test_quit_new_connection_refused_once_anything_follows_the_message(after: str) -> None:
    client = negotiated() if after != "version2" else MilterClient()
    if after == "version2":
        client.start()
        client.data_to_send()
        feed(client, optneg(version=2))
    _one_message(client, b"c")
    if after == "mail":
        client.mail("<x@y>")  # a second transaction began
    elif after == "abort":
        client.abort()
    assert not client.can_quit_new_connection
