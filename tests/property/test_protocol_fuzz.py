"""Hypothesis: any bytes, in any chunking, give only events and well-formed replies.

* Robustness: arbitrary input (random bytes mixed with real commands, body
  fragments and smuggling sequences) never raises; every event is an Event,
  every reply line is well formed, every decision gets answered.
* Chunking invariance: the same input split anywhere gives the same replies
  and the same events (BodyData runs merged).
* A rule-based state machine sends commands and bytes one step at a time and
  checks the connection's invariants after each.
"""

from __future__ import annotations

import os
import re

from hypothesis import event as event_name
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from postillon.core.reply import Reply
from postillon.protocol.events import (
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    Event,
    Hello,
    MessageAborted,
    StartTlsRequested,
)
from postillon.protocol.server import ServerConnection, ServerSettings, State
from postillon.testing.transcript import ScriptedAdapter

VOCABULARY = [
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"LHLO c.test\r\n",
    b"EHLO bad_name\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x+2B\r\n",
    b"MAIL FROM:<s@reject.test>\r\n",
    b"MAIL FROM:<j\xc3\xbcrgen@example.org> SMTPUTF8\r\n",
    b"MAIL FROM:<a@example.org> SIZE=999999999\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"RCPT TO:<x@reject.test>\r\n",
    b"RCPT TO:<full@example.com> NOTIFY=SUCCESS ORCPT=rfc822;a+40b\r\n",
    b"RCPT TO:<n@nodata.test>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"VRFY x\r\n",
    b"EXPN x\r\n",
    b"HELP\r\n",
    b"AUTH PLAIN AAAA\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b"x" * 600,
    b"body line\r\n",
]

# POSTILLON_FUZZ_EXAMPLES=20000 for a deeper run than the default.
EXAMPLES = int(os.environ.get("POSTILLON_FUZZ_EXAMPLES", "300"))

OPEN = b"EHLO c.test\r\nLHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
PREFIXES = [b"", OPEN, OPEN + b"DATA\r\n", OPEN + b"BDAT 12\r\n", OPEN + b"BDAT 30 LAST\r\n"]

# Mostly protocol fragments (Hypothesis' random bytes are rich in NULs, which
# would end most messages early), some random bytes.
token = st.one_of(st.sampled_from(VOCABULARY), st.sampled_from(VOCABULARY), st.binary(max_size=16))
# Often start inside a transaction, so that bodies and chunks get fuzzed too.
inputs = st.tuples(st.sampled_from(PREFIXES), st.lists(token, max_size=40)).map(
    lambda t: t[0] + b"".join(t[1])
)

server_settings = st.builds(
    ServerSettings,
    hostname=st.just("mx.test"),
    max_message_size=st.sampled_from([0, 20, 1000]),
    max_recipients=st.sampled_from([0, 1, 3]),
    max_errors=st.sampled_from([0, 3, 20]),
    max_command_line=st.sampled_from([512, 2048]),
    starttls=st.booleans(),
    tls_active=st.booleans(),
    lmtp=st.booleans(),
    chunking=st.booleans(),
    smtputf8=st.booleans(),
    dsn=st.booleans(),
    auth_mechanisms=st.sampled_from([(), ("PLAIN",)]),
)

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3}( |\Z)")


class FuzzAdapter(ScriptedAdapter):
    """The transcripts' policy; STARTTLS accepted (never completing) or refused."""

    def __init__(self, conn: ServerConnection, starttls_ok: bool) -> None:
        super().__init__(conn)
        self.starttls_ok = starttls_ok

    def handle(self, event: Event) -> None:
        if isinstance(event, StartTlsRequested) and not self.starttls_ok:
            self.conn.reply(Reply.of(454, "4.7.0", "TLS not available"))
        else:
            super().handle(event)


class Run:
    def __init__(self, conf: ServerSettings, starttls_ok: bool) -> None:
        self.conn = ServerConnection(conf)
        self.adapter = FuzzAdapter(self.conn, starttls_ok)
        self.events: list[Event] = []
        self.output = bytearray()
        self.conn.greet(Reply.of(220, None, "mx.test ESMTP"))
        self.pump()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Event)
            self.events.append(event)
            self.adapter.handle(event)
        self.output += self.conn.data_to_send()

    def feed(self, data: bytes) -> None:
        if data:
            self.conn.receive_data(data)
            self.pump()

    def close(self) -> None:
        self.conn.receive_data(b"")
        self.pump()


def check_output(output: bytes, events: list[Event]) -> None:
    assert output.endswith(b"\r\n")
    lines = output.split(b"\r\n")[:-1]
    hellos = sum(isinstance(e, Hello) for e in events)
    continuing: bytes | None = None
    unexempt_250 = 0
    for line in lines:
        m = _LINE.match(line)
        assert m, line
        code, sep, text = m.groups()
        if continuing is not None:
            assert code == continuing, line  # a multi-line reply keeps its code
        continuing = code if sep == b"-" else None
        if not _ENHANCED.match(text):
            # RFC 2034 exemptions: the greeting, the hello reply, the 354
            assert code in (b"220", b"250", b"354"), line
            if code == b"250" and sep == b" ":
                unexempt_250 += 1
    assert continuing is None
    assert unexempt_250 <= hellos  # each hello reply ends once
    assert lines[0].startswith(b"220 ")


def merged(events: list[Event]) -> list[object]:
    """Events with each run of BodyData merged into one bytes value."""
    out: list[object] = []
    for event in events:
        if isinstance(event, BodyData):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        else:
            out.append(event)
    return out


def _split_loose(items: list[object]) -> tuple[list[object], dict[int, bytes]]:
    """Take out content runs followed by a refusal, an EOF or the end of input."""
    strict: list[object] = []
    loose: dict[int, bytes] = {}
    for i, item in enumerate(items):
        following = items[i + 1] if i + 1 < len(items) else None
        if isinstance(item, bytes) and (
            following is None or isinstance(following, MessageAborted | ConnectionClosed)
        ):
            loose[len(strict)] = item
        else:
            strict.append(item)
    return strict, loose


def assert_same_events(left: list[Event], right: list[Event]) -> None:
    """Equal, except that content passed on before a refusal (or before the input
    ends inside a message) depends on where the fault fell: there one content run
    need only be a prefix of the other (both are prefixes of the real content)."""
    strict_a, loose_a = _split_loose(merged(left))
    strict_b, loose_b = _split_loose(merged(right))
    assert strict_a == strict_b
    for key in loose_a.keys() | loose_b.keys():
        x, y = loose_a.get(key, b""), loose_b.get(key, b"")
        assert x.startswith(y) or y.startswith(x), (x, y)


@settings(max_examples=EXAMPLES, deadline=None)
@given(conf=server_settings, data=inputs, eof=st.booleans(), starttls_ok=st.booleans())
def test_any_input_gives_events_and_valid_replies(
    conf: ServerSettings, data: bytes, eof: bool, starttls_ok: bool
) -> None:
    run = Run(conf, starttls_ok)
    run.feed(data)
    if eof:
        run.close()
        assert run.conn.closing
    for event in run.events:
        event_name(type(event).__name__)  # coverage, in --hypothesis-show-statistics
    check_output(bytes(run.output), run.events)
    if run.conn.closing and not eof:
        assert run.output.endswith(
            (b"221 2.0.0 Bye\r\n", b"421 4.7.0 Too many errors, closing connection\r\n")
        )


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    conf=server_settings,
    data=inputs,
    eof=st.booleans(),
    starttls_ok=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_chunking_invariance(
    conf: ServerSettings, data: bytes, eof: bool, starttls_ok: bool, cuts: list[int]
) -> None:
    whole = Run(conf, starttls_ok)
    whole.feed(data)
    split = Run(conf, starttls_ok)
    points = sorted({c % (len(data) + 1) for c in cuts})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        if end > start:
            split.feed(data[start:end])
    bytewise = Run(conf, starttls_ok)
    for i in range(len(data)):
        bytewise.feed(data[i : i + 1])
    if eof:
        for run in (whole, split, bytewise):
            run.close()
    assert split.output == whole.output
    assert bytewise.output == whole.output
    assert_same_events(split.events, whole.events)
    assert_same_events(bytewise.events, whole.events)


class ConnectionMachine(RuleBasedStateMachine):
    """One step at a time: the connection's invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.run = Run(ServerSettings("mx.test", max_message_size=50, starttls=True), True)
        self.eof = False

    @rule(data=st.sampled_from(VOCABULARY))
    def send_command(self, data: bytes) -> None:
        if not self.eof:
            self.run.feed(data)

    @rule(data=st.binary(min_size=1, max_size=30))
    def send_bytes(self, data: bytes) -> None:
        if not self.eof:
            self.run.feed(data)

    @rule()
    def close(self) -> None:
        self.eof = True
        self.run.close()

    @invariant()
    def consistent(self) -> None:
        conn = self.run.conn
        assert isinstance(conn.state, State)
        assert conn.closing == (conn.state is State.CLOSED)
        assert conn.next_event() is NEED_DATA  # every decision was answered
        assert conn.data_to_send() == b""
        if self.eof:
            assert conn.closing


TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.settings = settings(
    max_examples=max(100, EXAMPLES // 3), stateful_step_count=40, deadline=None
)
